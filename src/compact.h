/*
 * compact.h
 *		Private header of billing.compact_usage(), which folds the appended
 *		usage deltas into the packed store billing.usage_days (see store.h).
 *
 *		billing.compact_usage() -> bigint (the delta cells folded)
 *
 * One compaction at a time (a SHARE ROW EXCLUSIVE lock on usage_days);
 * ingest goes on meanwhile, since it only appends.  The deltas are taken out by one DELETE ...
 * RETURNING read through a cursor (its rows wait in a tuplestore, which
 * spills to disk), and folded in batches whose cells fit in
 * maintenance_work_mem.  A batch:
 *
 *	1. decodes the cells of its delta rows (src/cells.c), each with its
 *	   account and series (meter, dimension);
 *	2. sorts them by (account, series, bucket) and combines the cells of
 *	   one key by the one rule of src/agg.c;
 *	3. reads the rows of usage_days that the batch's (account, meter, day,
 *	   dimension) keys already have (SLICE_KEYS keys at a time, day by day
 *	   by the accounts and meters with cells that day, so a late cell reads
 *	   its own day and the rows held stay bounded), merges each with the
 *	   batch's cells of
 *	   the key (decode, merge by bucket, combine, re-encode) and its day
 *	   total with theirs, and writes the rows in one upsert per 10,000;
 *	4. for the unique meters, hands the cells to billing._unique_fold per
 *	   account (46_unique.sql).
 *
 * On one node the rows are written straight into the heap and primary key
 * of usage_days (new ones multi-inserted as COPY does, existing ones
 * updated in place); the rest is SQL through SPI.  On Citus the same heap
 * path runs on the node that holds each pair of co-located shards (a shard
 * of usage_deltas and the usage_days shard of its shard group), under a
 * lock of its own: compact_usage() on the coordinator has every node
 * compact the shards it holds, all nodes at once; on a worker node it
 * compacts that node's shards (34_compaction.sql, billing._compact_pair).
 * Only on a coordinator in a transaction block, whose writes the nodes'
 * own connections would not see, are the deltas taken out and the rows
 * written through SQL that Citus routes (one upsert per 10,000 rows).
 *
 * One job per file, sharing Compaction:
 *
 *		compact.c			the SQL entry points (compact_usage, and
 *							_compact_pair for a pair of shards), the
 *							meters, the batch driver (steps 2 to 4) and
 *							the unique meters
 *		compact_deltas.c	the deltas taken out (heap or SQL) and decoded
 *							into a batch (step 1)
 *		compact_sort.c		a batch's series ranked, its cells sorted and
 *							combined (step 2)
 *		compact_merge.c		the rows usage_days has already, merged with
 *							the batch's cells (step 3)
 *		compact_write.c		the rows written: heap and primary key (one
 *							node, a Citus shard), or upserts through SQL
 */
#ifndef BILLING_COMPACT_H
#define BILLING_COMPACT_H

#include "postgres.h"

#include "executor/executor.h"
#include "lib/stringinfo.h"
#include "storage/itemptr.h"
#include "utils/hsearch.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "agg.h"
#include "cells.h"
#include "decimal.h"
#include "store.h"

/* keys of a batch whose existing rows are read and merged at a time */
#define SLICE_KEYS		4096

/* rows of usage_days written per statement (SQL, a Citus coordinator) */
#define WRITE_CHUNK		10000

/* a meter of billing.meters */
typedef struct CMeter
{
	char	   *name;
	int			len;
	Aggregation agg;
	bool		is_unique;
} CMeter;

/* the key of a series: its meter and dimension, length-prefixed */
typedef struct SeriesKey
{
	const char *bytes;			/* u8 meter length, meter, dimension */
	int			len;
} SeriesKey;

/* room for the key of most series without an allocation */
#define SERIES_KEY_TMP	(1 + 255 + 1024)

/*
 * billing_series_key
 *		The key of series (meter, dimension), written in tmp (SERIES_KEY_TMP
 *		bytes) when it fits, else in palloc'd memory; meterlen <= 255.
 */
static inline SeriesKey
billing_series_key(const char *meter, int meterlen, const char *dim, int dimlen, char *tmp)
{
	SeriesKey	key;
	char	   *buf = tmp;

	key.len = 1 + meterlen + dimlen;
	if (key.len > SERIES_KEY_TMP)
		buf = palloc(key.len);
	buf[0] = (char) meterlen;
	memcpy(buf + 1, meter, meterlen);
	memcpy(buf + 1 + meterlen, dim, dimlen);
	key.bytes = buf;
	return key;
}

/* a (meter, dimension) of the batch */
typedef struct Series
{
	SeriesKey	key;			/* hash key: first */
	int			index;			/* in the batch's series array */
	int			rank;			/* order of (meter, dimension) bytes */
	const CMeter *meter;
	const char *dim;
	int			dimlen;
} Series;

/* one cell of the batch */
typedef struct BatchCell
{
	int64		account;
	int32		series;			/* index, then rank once sorted */
	int32		scale;			/* >= 0: the quantity is coef / 10^scale, c.num
								 * is NULL; -1: c.num */
	int64		coef;
	UsageCell	c;
} BatchCell;

/* the key of an existing row of usage_days */
typedef struct RowKey
{
	int64		account;
	TimestampTz day;
	int32		series;			/* rank */
	int32		pad;			/* zero: dynahash compares raw bytes */
} RowKey;

/* an existing row of usage_days, read before its key is written */
typedef struct OldRow
{
	RowKey		key;
	UsageCell	total;
	bytea	   *cells;
	ItemPointerData tid;		/* where it is (one node) */
} OldRow;

/* the columns of usage_days, in order */
#define STORE_NATTS		9

/*
 * Writing usage_days straight into its heap and primary key (one node):
 * new rows multi-inserted as COPY does, existing ones updated in place.
 */
typedef struct StoreHeap
{
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleDesc	desc;			/* a copy of the relation's, for slots */
	TupleTableSlot **slots;		/* new rows queued */
	int			n;
	TupleTableSlot *upd_slot;	/* an updated row, for its index entries */
	bool		key_only;		/* the primary key is the only index */
	CommandId	cid;
	MemoryContext cxt;			/* the writer's own (outlives batches) */
} StoreHeap;

/* what compaction keeps across batches */
typedef struct Compaction
{
	CMeter	   *meters;
	int			nmeters;
	MemoryContext batch_cxt;	/* the batch: cells, series, rows */
	MemoryContext row_cxt;		/* the numerics of one row being merged */
	MemoryContext cells_cxt;	/* the array of the batch's cells */
	Size		limit;			/* bytes a batch may take */
	HTAB	   *series_hash;
	Series	  **series;
	int			nseries;
	int			series_cap;
	BatchCell  *cells;
	int			ncells;
	int			cells_cap;
	int64		folded;			/* delta cells folded, all batches */
	/* the rows to write */
	int			nout;
	Datum	   *o_account,
			   *o_meter,
			   *o_day,
			   *o_dim,
			   *o_qty,
			   *o_events,
			   *o_ts,
			   *o_seq,
			   *o_cells;
	bool	   *o_ts_null,
			   *o_seq_null;
	StoreHeap  *heap;			/* heap path: the heap writer, else NULL (SQL) */
	/* the relations worked on (heap path): usage_deltas and usage_days or a
	 * co-located pair of their shards */
	Oid			deltas_rel;
	Oid			days_rel;
	const char *days_name;		/* usage_days or its shard, quoted for SQL */
} Compaction;

/*
 * cell_value
 *		The cell of b with its quantity as a numeric (made in the current
 *		memory context when b holds it in fixed point).
 */
static inline UsageCell
cell_value(const BatchCell *b)
{
	UsageCell	c = b->c;

	if (b->scale >= 0)
		c.num = billing_dec_to_numeric(b->coef, b->scale);
	return c;
}

/* compact.c */
extern void billing_compact_fold(Compaction *cp);

/* compact_deltas.c */
extern void billing_compact_begin(Compaction *cp);
extern void billing_compact_take_sql(Compaction *cp);
extern void billing_compact_take_heap(Compaction *cp);

/* compact_sort.c */
extern Series **billing_compact_sort(Compaction *cp, bool *any_unique);

/* compact_merge.c */
extern HTAB *billing_compact_old_rows(Compaction *cp, Series **by_rank, int from, int to,
										MemoryContext cxt);
extern void billing_compact_write_row(Compaction *cp, const Series *ser, int64 account,
									  TimestampTz day, const BatchCell *new, int n,
									  const OldRow *old, StringInfo buf);

/* compact_write.c */
extern void billing_compact_out_reserve(Compaction *cp, int cap);
extern Datum billing_compact_array(Datum *values, bool *nulls, int n, Oid type, int len,
								   bool byval, char align);
extern void billing_compact_out_flush(Compaction *cp);
extern StoreHeap *billing_compact_heap_begin(Oid days_rel);
extern void billing_compact_heap_flush(StoreHeap *h);
extern void billing_compact_heap_end(StoreHeap *h);
extern void billing_compact_heap_write(StoreHeap *h, Datum *values, bool *nulls,
									   const OldRow *old);

#endif							/* BILLING_COMPACT_H */
