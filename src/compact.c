/*
 * compact.c
 *		billing.compact_usage(): folds the appended usage deltas into the
 *		packed store billing.usage_days (see store.h).
 *
 *		billing.compact_usage() -> bigint (the delta cells folded)
 *
 * One compaction at a time (an advisory lock); ingest goes on meanwhile,
 * since it only appends.  The deltas are taken out by one DELETE ...
 * RETURNING read through a cursor (its rows wait in a tuplestore, which
 * spills to disk), and folded in batches whose cells fit in
 * maintenance_work_mem.  A batch:
 *
 *	1. decodes the cells of its delta rows (src/cells.c), each with its
 *	   account and series (meter, dimension);
 *	2. sorts them by (account, series, bucket) and combines the cells of
 *	   one key by the one rule of src/agg.c;
 *	3. reads the rows of usage_days that the batch's (account, meter, day,
 *	   dimension) keys already have, merges each with the batch's cells of
 *	   the key (decode, merge by bucket, combine, re-encode) and its day
 *	   total with theirs, and writes the rows in one upsert per 10,000;
 *	4. for the unique meters, hands the cells to billing._unique_fold per
 *	   account (46_unique.sql).
 *
 * On one node the rows are written straight into the heap and primary key
 * of usage_days (new ones multi-inserted as COPY does, existing ones
 * updated in place); the rest is SQL through SPI.  On a Citus coordinator,
 * where usage_days is a shell, the writes are SQL too (one upsert per
 * 10,000 rows), which Citus routes to the shards.
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "storage/itemptr.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "agg.h"
#include "catalog.h"
#include "cells.h"
#include "store.h"
#include "util.h"

PG_FUNCTION_INFO_V1(billing_compact_usage);

/* rows of usage_days written per statement (Citus) */
#define WRITE_CHUNK		10000
/* new rows of usage_days multi-inserted at a time (one node) */
#define HEAP_CHUNK		1000
/* delta rows fetched at a time */
#define FETCH_ROWS		1000

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
	TupleTableSlot **slots;		/* new rows queued */
	int			n;
	TupleTableSlot *upd_slot;	/* an updated row, for its index entries */
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
	StoreHeap  *heap;			/* one node: the heap writer, else NULL (SQL) */
} Compaction;

/* hash of a series key */
static uint32
series_hash_fn(const void *key, Size keysize)
{
	const SeriesKey *k = (const SeriesKey *) key;

	return DatumGetUInt32(hash_any((const unsigned char *) k->bytes, k->len));
}

/* equality of series keys (0: equal) */
static int
series_match_fn(const void *a, const void *b, Size keysize)
{
	const SeriesKey *x = (const SeriesKey *) a;
	const SeriesKey *y = (const SeriesKey *) b;

	if (x->len != y->len)
		return 1;
	return memcmp(x->bytes, y->bytes, x->len);
}

/*
 * load_meters
 *		Every meter and its aggregation, sorted by name bytes.
 */
static void
load_meters(Compaction *cp, MemoryContext cxt)
{
	int			ret;

	ret = SPI_execute("SELECT meter::text, aggregation::text FROM billing.meters "
					  "ORDER BY meter COLLATE \"C\"", true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading billing.meters failed: %s", SPI_result_code_string(ret));
	cp->nmeters = (int) SPI_processed;
	cp->meters = MemoryContextAllocZero(cxt, Max(cp->nmeters, 1) * sizeof(CMeter));
	for (int i = 0; i < cp->nmeters; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *name = SPI_getvalue(tup, desc, 1);
		char	   *agg = SPI_getvalue(tup, desc, 2);

		cp->meters[i].name = MemoryContextStrdup(cxt, name);
		cp->meters[i].len = strlen(name);
		cp->meters[i].agg = billing_aggregation(agg);
		cp->meters[i].is_unique = strcmp(agg, "unique") == 0;
	}
	SPI_freetuptable(SPI_tuptable);
}

/* the meter named name[0..len), or NULL */
static const CMeter *
find_meter(const Compaction *cp, const char *name, int len)
{
	int			lo = 0,
				hi = cp->nmeters - 1;

	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;
		const CMeter *m = &cp->meters[mid];
		int			c = memcmp(m->name, name, Min(m->len, len));

		if (c == 0)
			c = (m->len > len) - (m->len < len);
		if (c == 0)
			return m;
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return NULL;
}

/* start a batch: empty series and cells */
static void
batch_begin(Compaction *cp)
{
	HASHCTL		ctl;

	MemoryContextReset(cp->batch_cxt);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(SeriesKey);
	ctl.entrysize = sizeof(Series);
	ctl.hash = series_hash_fn;
	ctl.match = series_match_fn;
	ctl.hcxt = cp->batch_cxt;
	cp->series_hash = hash_create("billing compaction series", 256, &ctl,
								  HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
	cp->series = NULL;
	cp->nseries = 0;
	cp->series_cap = 0;
	/*
	 * the cells of a batch in one array sized for the most that fit in the
	 * limit: allocated once (untouched pages cost nothing), never copied
	 * to grow
	 */
	MemoryContextReset(cp->cells_cxt);
	cp->cells_cap = (int) (Min(cp->limit, (Size) 256 * 1024 * 1024) / sizeof(BatchCell)) + 1024;
	cp->cells = MemoryContextAllocExtended(cp->cells_cxt, cp->cells_cap * sizeof(BatchCell),
										   MCXT_ALLOC_HUGE);
	cp->ncells = 0;
}

/* bytes the batch takes */
static inline Size
batch_bytes(Compaction *cp)
{
	return MemoryContextMemAllocated(cp->batch_cxt, true) + cp->ncells * sizeof(BatchCell);
}

/*
 * series_of
 *		The batch's series of (meter, dimension), added when new; NULL for
 *		a meter billing.meters does not have (its cells are dropped, as the
 *		join with billing.meters of 1.0's compaction dropped them).
 */
static Series *
series_of(Compaction *cp, const CellSeries *s)
{
	char		tmp[1 + 255 + 1024];
	char	   *buf = tmp;
	SeriesKey	key;
	Series	   *e;
	bool		found;
	const CMeter *m;

	if (1 + s->meterlen + s->dimlen > (int) sizeof(tmp))
		buf = palloc(1 + s->meterlen + s->dimlen);
	buf[0] = (char) s->meterlen;
	memcpy(buf + 1, s->meter, s->meterlen);
	memcpy(buf + 1 + s->meterlen, s->dim, s->dimlen);
	key.bytes = buf;
	key.len = 1 + s->meterlen + s->dimlen;
	e = hash_search(cp->series_hash, &key, HASH_FIND, NULL);
	if (e != NULL)
		return e->meter ? e : NULL;
	m = find_meter(cp, s->meter, s->meterlen);
	/* a key that outlives buf */
	key.bytes = MemoryContextAlloc(cp->batch_cxt, key.len);
	memcpy((char *) key.bytes, buf, key.len);
	e = hash_search(cp->series_hash, &key, HASH_ENTER, &found);
	e->key = key;
	e->meter = m;
	e->dim = key.bytes + 1 + s->meterlen;
	e->dimlen = s->dimlen;
	if (m == NULL)
		return NULL;
	if (cp->nseries == cp->series_cap)
		cp->series = billing_grow(cp->series, &cp->series_cap, sizeof(Series *), 64,
								  cp->batch_cxt);
	e->index = cp->nseries;
	cp->series[cp->nseries++] = e;
	return e;
}

/*
 * fixed_quantity
 *		Set the quantity of b from dec, a fixed-point value of
 *		CELLS_QTY_SCALE digits: coef / 10^scale with the fewest digits (the
 *		display scale the numeric of billing._delta_cells has), or a
 *		numeric beyond 64 bits.
 */
static void
fixed_quantity(BatchCell *b, int128_t dec)
{
	int			s = CELLS_QTY_SCALE;

	/* most quantities are whole numbers */
	if (dec % billing_dec_pow10[CELLS_QTY_SCALE] == 0)
	{
		dec /= billing_dec_pow10[CELLS_QTY_SCALE];
		s = 0;
	}
	else
		while (s > 0 && dec % 10 == 0)
		{
			dec /= 10;
			s--;
		}
	if (dec >= PG_INT64_MIN && dec <= PG_INT64_MAX)
	{
		b->coef = (int64) dec;
		b->scale = s;
	}
	else
		b->c.num = billing_dec_to_numeric(dec, s);
}

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

/*
 * add_delta_row
 *		Decode the cells of one delta row (account, seq, packed cells) into
 *		the batch.
 */
static void
add_delta_row(Compaction *cp, int64 account, bool seq_null, int64 seq, bytea *packed)
{
	CellReader	r;
	CellSeries	s;
	MemoryContext old = MemoryContextSwitchTo(cp->batch_cxt);

	billing_cells_open(&r, VARDATA_ANY(packed), VARSIZE_ANY_EXHDR(packed));
	while (billing_cells_next_series(&r, &s))
	{
		Series	   *ser = series_of(cp, &s);

		for (uint32 i = 0; i < s.ncells; i++)
		{
			Cell		c;
			BatchCell  *b;

			billing_cells_next(&r, &s, &c);
			if (ser == NULL)
				continue;
			if (cp->ncells == cp->cells_cap)
			{
				/* a delta row with more cells than the limit left room for */
				cp->cells_cap *= 2;
				cp->cells = repalloc_huge(cp->cells, cp->cells_cap * sizeof(BatchCell));
			}
			b = &cp->cells[cp->ncells++];
			b->account = account;
			b->series = ser->index;
			b->c.bucket = c.bucket_start;
			b->c.events = c.events;
			b->scale = -1;
			b->c.num = NULL;
			if (c.isdec)
				fixed_quantity(b, c.dec);
			else
				b->c.num = c.num;
			if (s.is_last)
			{
				b->c.last_ts = c.last_ts;
				b->c.last_seq = seq_null ? AGG_NO_SEQ : seq;
			}
			else
			{
				b->c.last_ts = AGG_NO_TS;
				b->c.last_seq = AGG_NO_SEQ;
			}
			cp->folded++;
		}
	}
	MemoryContextSwitchTo(old);
}

/* order of series by (meter, dimension) bytes, as COLLATE "C" */
static int
series_cmp(const void *a, const void *b)
{
	const Series *x = *(Series *const *) a;
	const Series *y = *(Series *const *) b;
	int			c;

	c = memcmp(x->meter->name, y->meter->name, Min(x->meter->len, y->meter->len));
	if (c != 0)
		return c;
	if (x->meter->len != y->meter->len)
		return x->meter->len < y->meter->len ? -1 : 1;
	c = memcmp(x->dim, y->dim, Min(x->dimlen, y->dimlen));
	if (c != 0)
		return c;
	return (x->dimlen > y->dimlen) - (x->dimlen < y->dimlen);
}

/* order of batch cells by (account, series rank, bucket) */
static inline int
cell_cmp(const BatchCell *x, const BatchCell *y)
{
	if (x->account != y->account)
		return x->account < y->account ? -1 : 1;
	if (x->series != y->series)
		return x->series < y->series ? -1 : 1;
	if (x->c.bucket != y->c.bucket)
		return x->c.bucket < y->c.bucket ? -1 : 1;
	return 0;
}

/* sort_cells(cells, n): a sort of batch cells with cell_cmp inlined */
#define ST_SORT sort_cells
#define ST_ELEMENT_TYPE BatchCell
#define ST_COMPARE(a, b) cell_cmp(a, b)
#define ST_SCOPE static
#define ST_DECLARE
#define ST_DEFINE
#include "lib/sort_template.h"

/*
 * read_old_rows
 *		The rows of usage_days of the batch's accounts and days whose
 *		series is in the batch, keyed by (account, day, series rank).
 */
static HTAB *
read_old_rows(Compaction *cp, Series **by_rank)
{
	HASHCTL		ctl;
	HTAB	   *rows;
	Datum	   *accounts;
	int			naccounts = 0;
	TimestampTz lo = DT_NOEND,
				hi = DT_NOBEGIN;
	Datum		args[3];
	Oid			types[3] = {INT8ARRAYOID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	int			ret;
	MemoryContext old = MemoryContextSwitchTo(cp->batch_cxt);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(RowKey);
	ctl.entrysize = sizeof(OldRow);
	ctl.hcxt = cp->batch_cxt;
	rows = hash_create("billing compaction rows", 1024, &ctl,
					   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	accounts = palloc(Max(cp->ncells, 1) * sizeof(Datum));
	for (int i = 0; i < cp->ncells; i++)
	{
		TimestampTz day = STORE_DAY(cp->cells[i].c.bucket);

		if (naccounts == 0 || DatumGetInt64(accounts[naccounts - 1]) != cp->cells[i].account)
			accounts[naccounts++] = Int64GetDatum(cp->cells[i].account);
		lo = Min(lo, day);
		hi = Max(hi, day);
	}
	args[0] = PointerGetDatum(construct_array(accounts, naccounts, INT8OID, 8, true,
											  TYPALIGN_DOUBLE));
	args[1] = TimestampTzGetDatum(lo);
	args[2] = TimestampTzGetDatum(hi);
	MemoryContextSwitchTo(old);

	/* not read-only: it must see the rows the earlier batches wrote */
	ret = SPI_execute_with_args("SELECT account_id, meter::text, day, dimension::text, quantity, "
								"events, last_ts, last_seq, cells, ctid FROM billing.usage_days "
								"WHERE account_id = ANY ($1) AND day >= $2 AND day <= $3",
								3, types, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading billing.usage_days failed: %s", SPI_result_code_string(ret));

	old = MemoryContextSwitchTo(cp->batch_cxt);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		text	   *meter = DatumGetTextPP(SPI_getbinval(tup, desc, 2, &isnull));
		text	   *dim = DatumGetTextPP(SPI_getbinval(tup, desc, 4, &isnull));
		CellSeries	s;
		Series	   *ser;
		SeriesKey	key;
		char		tmp[1 + 255 + 1024];
		char	   *buf = tmp;
		RowKey		rk;
		OldRow	   *row;
		bool		found;
		Datum		d;

		s.meter = VARDATA_ANY(meter);
		s.meterlen = VARSIZE_ANY_EXHDR(meter);
		s.dim = VARDATA_ANY(dim);
		s.dimlen = VARSIZE_ANY_EXHDR(dim);
		if (s.meterlen > 255)
			continue;
		if (1 + s.meterlen + s.dimlen > (int) sizeof(tmp))
			buf = palloc(1 + s.meterlen + s.dimlen);
		buf[0] = (char) s.meterlen;
		memcpy(buf + 1, s.meter, s.meterlen);
		memcpy(buf + 1 + s.meterlen, s.dim, s.dimlen);
		key.bytes = buf;
		key.len = 1 + s.meterlen + s.dimlen;
		ser = hash_search(cp->series_hash, &key, HASH_FIND, NULL);
		if (ser == NULL || ser->meter == NULL)
			continue;
		memset(&rk, 0, sizeof(rk));
		rk.account = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		rk.day = DatumGetTimestampTz(SPI_getbinval(tup, desc, 3, &isnull));
		rk.series = ser->rank;
		row = hash_search(rows, &rk, HASH_ENTER, &found);
		memset(&row->total, 0, sizeof(UsageCell));
		row->total.bucket = rk.day;
		row->total.num = DatumGetNumericCopy(SPI_getbinval(tup, desc, 5, &isnull));
		row->total.events = DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
		d = SPI_getbinval(tup, desc, 7, &isnull);
		row->total.last_ts = isnull ? AGG_NO_TS : DatumGetTimestampTz(d);
		d = SPI_getbinval(tup, desc, 8, &isnull);
		row->total.last_seq = isnull ? AGG_NO_SEQ : DatumGetInt64(d);
		row->cells = DatumGetByteaPCopy(SPI_getbinval(tup, desc, 9, &isnull));
		row->tid = *(ItemPointer) DatumGetPointer(SPI_getbinval(tup, desc, 10, &isnull));
	}
	MemoryContextSwitchTo(old);
	SPI_freetuptable(SPI_tuptable);
	(void) by_rank;
	return rows;
}

/* make room for n more rows to write */
static void
out_reserve(Compaction *cp, int cap)
{
	MemoryContext old = MemoryContextSwitchTo(cp->batch_cxt);

	cp->o_account = palloc(cap * sizeof(Datum));
	cp->o_meter = palloc(cap * sizeof(Datum));
	cp->o_day = palloc(cap * sizeof(Datum));
	cp->o_dim = palloc(cap * sizeof(Datum));
	cp->o_qty = palloc(cap * sizeof(Datum));
	cp->o_events = palloc(cap * sizeof(Datum));
	cp->o_ts = palloc(cap * sizeof(Datum));
	cp->o_seq = palloc(cap * sizeof(Datum));
	cp->o_cells = palloc(cap * sizeof(Datum));
	cp->o_ts_null = palloc(cap * sizeof(bool));
	cp->o_seq_null = palloc(cap * sizeof(bool));
	cp->nout = 0;
	MemoryContextSwitchTo(old);
}

/* a one-dimensional array of n values */
static Datum
out_array(Datum *values, bool *nulls, int n, Oid type, int len, bool byval, char align)
{
	int			dims[1] = {n};
	int			lbs[1] = {1};

	return PointerGetDatum(construct_md_array(values, nulls, 1, dims, lbs, type, len, byval,
											  align));
}

/*
 * out_flush
 *		Write the rows collected: one upsert of their arrays.
 */
static void
out_flush(Compaction *cp)
{
	Datum		args[9];
	Oid			types[9] = {INT8ARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID, TEXTARRAYOID,
	NUMERICARRAYOID, INT8ARRAYOID, TIMESTAMPTZARRAYOID, INT8ARRAYOID, BYTEAARRAYOID};
	int			ret;
	int			n = cp->nout;
	MemoryContext old;

	if (n == 0)
		return;
	old = MemoryContextSwitchTo(cp->batch_cxt);
	args[0] = out_array(cp->o_account, NULL, n, INT8OID, 8, true, TYPALIGN_DOUBLE);
	args[1] = out_array(cp->o_meter, NULL, n, TEXTOID, -1, false, TYPALIGN_INT);
	args[2] = out_array(cp->o_day, NULL, n, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE);
	args[3] = out_array(cp->o_dim, NULL, n, TEXTOID, -1, false, TYPALIGN_INT);
	args[4] = out_array(cp->o_qty, NULL, n, NUMERICOID, -1, false, TYPALIGN_INT);
	args[5] = out_array(cp->o_events, NULL, n, INT8OID, 8, true, TYPALIGN_DOUBLE);
	args[6] = out_array(cp->o_ts, cp->o_ts_null, n, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE);
	args[7] = out_array(cp->o_seq, cp->o_seq_null, n, INT8OID, 8, true, TYPALIGN_DOUBLE);
	args[8] = out_array(cp->o_cells, NULL, n, BYTEAOID, -1, false, TYPALIGN_INT);
	MemoryContextSwitchTo(old);
	ret = SPI_execute_with_args("INSERT INTO billing.usage_days AS u (account_id, meter, day, "
								"dimension, quantity, events, last_ts, last_seq, cells) "
								"SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9) "
								"ON CONFLICT (account_id, meter, day, dimension) DO UPDATE "
								"SET quantity = excluded.quantity, events = excluded.events, "
								"last_ts = excluded.last_ts, last_seq = excluded.last_seq, "
								"cells = excluded.cells",
								9, types, args, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "writing billing.usage_days failed: %s", SPI_result_code_string(ret));
	cp->nout = 0;
}

/* open usage_days for writing straight into its heap and indexes */
static StoreHeap *
heap_begin(void)
{
	StoreHeap  *h = palloc0(sizeof(StoreHeap));

	h->rel = table_open(billing_relid("usage_days"), RowExclusiveLock);
	if (RelationGetDescr(h->rel)->natts != STORE_NATTS)
		elog(ERROR, "billing.usage_days does not have the columns compaction writes");
	h->estate = CreateExecutorState();
	h->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(h->rri, h->rel, 1, NULL, 0);
	ExecOpenIndices(h->rri, false);
	h->slots = palloc(HEAP_CHUNK * sizeof(TupleTableSlot *));
	for (int i = 0; i < HEAP_CHUNK; i++)
		h->slots[i] = NULL;
	h->upd_slot = MakeSingleTupleTableSlot(RelationGetDescr(h->rel), &TTSOpsHeapTuple);
	h->cid = GetCurrentCommandId(true);
	h->cxt = CurrentMemoryContext;
	return h;
}

/* multi-insert the queued new rows and their index entries */
static void
heap_flush_new(StoreHeap *h)
{
	if (h->n == 0)
		return;
	table_multi_insert(h->rel, h->slots, h->n, h->cid, 0, NULL);
	for (int i = 0; i < h->n; i++)
	{
		List	   *r = ExecInsertIndexTuples(h->rri, h->slots[i], h->estate,
											  false, false, NULL, NIL);

		list_free(r);
		ExecClearTuple(h->slots[i]);
	}
	ResetPerTupleExprContext(h->estate);
	h->n = 0;
}

/* write the rest and close */
static void
heap_end(StoreHeap *h)
{
	heap_flush_new(h);
	for (int i = 0; i < HEAP_CHUNK; i++)
		if (h->slots[i] != NULL)
			ExecDropSingleTupleTableSlot(h->slots[i]);
	ExecDropSingleTupleTableSlot(h->upd_slot);
	ExecCloseIndices(h->rri);
	FreeExecutorState(h->estate);
	table_close(h->rel, NoLock);
}

/*
 * heap_write
 *		Write one row of usage_days: replace the row at old (an update, with
 *		index entries unless it stays on its page as a heap-only tuple) or
 *		queue a new one.
 */
static void
heap_write(StoreHeap *h, Datum *values, bool *nulls, const OldRow *old)
{
	if (old != NULL)
	{
		HeapTuple	tup = heap_form_tuple(RelationGetDescr(h->rel), values, nulls);
		ItemPointerData otid = old->tid;

		simple_heap_update(h->rel, &otid, tup);
		if (!HeapTupleIsHeapOnly(tup))
		{
			List	   *r;

			ExecStoreHeapTuple(tup, h->upd_slot, false);
			/* not as an UPDATE: that would look for the updated columns in a range table */
			r = ExecInsertIndexTuples(h->rri, h->upd_slot, h->estate, false, false, NULL, NIL);
			list_free(r);
			ExecClearTuple(h->upd_slot);
		}
		heap_freetuple(tup);
		return;
	}
	if (h->slots[h->n] == NULL)
	{
		MemoryContext oldcxt = MemoryContextSwitchTo(h->cxt);

		h->slots[h->n] = MakeSingleTupleTableSlot(RelationGetDescr(h->rel),
												  table_slot_callbacks(h->rel));
		MemoryContextSwitchTo(oldcxt);
	}
	ExecClearTuple(h->slots[h->n]);
	memcpy(h->slots[h->n]->tts_values, values, STORE_NATTS * sizeof(Datum));
	memcpy(h->slots[h->n]->tts_isnull, nulls, STORE_NATTS * sizeof(bool));
	ExecStoreVirtualTuple(h->slots[h->n]);
	if (++h->n == HEAP_CHUNK)
		heap_flush_new(h);
}

/* append a batch cell to a packed value */
static inline void
store_batch_cell(StoreWriter *w, const BatchCell *b)
{
	if (b->scale >= 0 && b->scale <= STORE_MAX_SCALE)
		billing_store_add_fixed(w, &b->c, b->coef, b->scale);
	else
	{
		UsageCell	v = cell_value(b);

		billing_store_add(w, &v);
	}
}

/*
 * write_row
 *		Merge the cells new[0..n) (sorted, distinct buckets, one account,
 *		series and day) with the existing row old (or none) and queue the
 *		result for writing.
 */
static void
write_row(Compaction *cp, const Series *ser, int64 account, TimestampTz day,
		  const BatchCell *new, int n, const OldRow *old, StringInfo buf)
{
	Aggregation agg = ser->meter->agg;
	bool		is_last = agg == AGG_LAST;
	StoreWriter w;
	UsageCell	total;
	int			k;
	int			i = 0;
	MemoryContext keep = MemoryContextSwitchTo(cp->row_cxt);

	/* the numerics of the merge and of the total are temporary (row_cxt) */
	billing_store_begin(&w, buf, is_last, day);
	if (old != NULL)
	{
		StoreReader r;
		UsageCell	oc;
		bool		have;

		total = old->total;
		billing_store_open(&r, VARDATA_ANY(old->cells), VARSIZE_ANY_EXHDR(old->cells), day);
		have = billing_store_next(&r, &oc);
		while (have || i < n)
		{
			if (have && (i >= n || oc.bucket < new[i].c.bucket))
			{
				billing_store_add(&w, &oc);
				have = billing_store_next(&r, &oc);
			}
			else if (have && oc.bucket == new[i].c.bucket)
			{
				UsageCell	v = cell_value(&new[i]);

				billing_cell_combine(agg, &oc, &v);
				billing_store_add(&w, &oc);
				i++;
				have = billing_store_next(&r, &oc);
			}
			else
			{
				store_batch_cell(&w, &new[i]);
				i++;
			}
		}
		k = 0;
	}
	else
	{
		total = cell_value(&new[0]);
		for (int j = 0; j < n; j++)
			store_batch_cell(&w, &new[j]);
		k = 1;
	}
	for (; k < n; k++)
	{
		UsageCell	v = cell_value(&new[k]);

		billing_cell_combine(agg, &total, &v);
	}
	/* what is written lives in the batch's context */
	MemoryContextSwitchTo(keep);
	billing_cell_keep(&total, cp->batch_cxt);
	MemoryContextReset(cp->row_cxt);

	if (cp->heap != NULL)
	{
		Datum		values[STORE_NATTS];
		bool		nulls[STORE_NATTS] = {false};

		values[0] = Int64GetDatum(account);
		values[1] = PointerGetDatum(cstring_to_text_with_len(ser->meter->name, ser->meter->len));
		values[2] = TimestampTzGetDatum(day);
		values[3] = PointerGetDatum(cstring_to_text_with_len(ser->dim, ser->dimlen));
		values[4] = NumericGetDatum(total.num);
		values[5] = Int64GetDatum(total.events);
		values[6] = TimestampTzGetDatum(total.last_ts);
		nulls[6] = total.last_ts == AGG_NO_TS;
		values[7] = Int64GetDatum(total.last_seq);
		nulls[7] = total.last_seq == AGG_NO_SEQ;
		values[8] = PointerGetDatum(billing_store_end(&w));
		heap_write(cp->heap, values, nulls, old);
		return;
	}
	if (cp->nout == WRITE_CHUNK)
		out_flush(cp);
	k = cp->nout++;
	cp->o_account[k] = Int64GetDatum(account);
	cp->o_meter[k] = PointerGetDatum(cstring_to_text_with_len(ser->meter->name, ser->meter->len));
	cp->o_day[k] = TimestampTzGetDatum(day);
	cp->o_dim[k] = PointerGetDatum(cstring_to_text_with_len(ser->dim, ser->dimlen));
	cp->o_qty[k] = NumericGetDatum(total.num);
	cp->o_events[k] = Int64GetDatum(total.events);
	cp->o_ts[k] = TimestampTzGetDatum(total.last_ts);
	cp->o_ts_null[k] = total.last_ts == AGG_NO_TS;
	cp->o_seq[k] = Int64GetDatum(total.last_seq);
	cp->o_seq_null[k] = total.last_seq == AGG_NO_SEQ;
	cp->o_cells[k] = PointerGetDatum(billing_store_end(&w));
}

/*
 * fold_unique
 *		Hand the cells of unique meters of one account, cells[0..n), to
 *		billing._unique_fold.
 */
static void
fold_unique(Compaction *cp, Series **by_rank, const BatchCell *cells, int n)
{
	Datum	   *meters = palloc(n * sizeof(Datum));
	Datum	   *dims = palloc(n * sizeof(Datum));
	Datum	   *buckets = palloc(n * sizeof(Datum));
	int			m = 0;
	Datum		args[4];
	Oid			types[4] = {INT8OID, TEXTARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID};
	int			ret;

	for (int i = 0; i < n; i++)
	{
		const Series *ser = by_rank[cells[i].series];

		if (!ser->meter->is_unique)
			continue;
		meters[m] = PointerGetDatum(cstring_to_text_with_len(ser->meter->name, ser->meter->len));
		dims[m] = PointerGetDatum(cstring_to_text_with_len(ser->dim, ser->dimlen));
		buckets[m] = TimestampTzGetDatum(cells[i].c.bucket);
		m++;
	}
	if (m == 0)
		return;
	args[0] = Int64GetDatum(cells[0].account);
	args[1] = out_array(meters, NULL, m, TEXTOID, -1, false, TYPALIGN_INT);
	args[2] = out_array(dims, NULL, m, TEXTOID, -1, false, TYPALIGN_INT);
	args[3] = out_array(buckets, NULL, m, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE);
	ret = SPI_execute_with_args("SELECT billing._unique_fold($1, $2, $3, $4)",
								4, types, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "billing._unique_fold failed: %s", SPI_result_code_string(ret));
	SPI_freetuptable(SPI_tuptable);
}

/*
 * batch_fold
 *		Fold the batch's cells into usage_days (steps 2 to 4 of the top of
 *		the file).
 */
static void
batch_fold(Compaction *cp)
{
	Series	  **by_rank;
	HTAB	   *old_rows;
	int			n = 0;
	bool		any_unique = false;
	StringInfoData buf;
	MemoryContext old;

	if (cp->ncells == 0)
		return;
	old = MemoryContextSwitchTo(cp->batch_cxt);

	/* series ranked by (meter, dimension); cells sorted and combined */
	by_rank = palloc(cp->nseries * sizeof(Series *));
	memcpy(by_rank, cp->series, cp->nseries * sizeof(Series *));
	qsort(by_rank, cp->nseries, sizeof(Series *), series_cmp);
	for (int r = 0; r < cp->nseries; r++)
	{
		by_rank[r]->rank = r;
		any_unique |= by_rank[r]->meter->is_unique;
	}
	for (int i = 0; i < cp->ncells; i++)
		cp->cells[i].series = cp->series[cp->cells[i].series]->rank;
	sort_cells(cp->cells, cp->ncells);
	for (int i = 0; i < cp->ncells; i++)
	{
		if (n > 0 && cell_cmp(&cp->cells[n - 1], &cp->cells[i]) == 0)
		{
			BatchCell  *into = &cp->cells[n - 1];
			UsageCell	v = cell_value(&cp->cells[i]);

			into->c = cell_value(into);
			into->scale = -1;
			billing_cell_combine(by_rank[cp->cells[i].series]->meter->agg, &into->c, &v);
		}
		else
			cp->cells[n++] = cp->cells[i];
	}
	cp->ncells = n;
	MemoryContextSwitchTo(old);

	/* the rows the batch's keys have already */
	old_rows = read_old_rows(cp, by_rank);

	/* one row per (account, series, day) */
	old = MemoryContextSwitchTo(cp->batch_cxt);
	out_reserve(cp, WRITE_CHUNK);
	initStringInfo(&buf);
	for (int i = 0; i < cp->ncells;)
	{
		const BatchCell *first = &cp->cells[i];
		TimestampTz day = STORE_DAY(first->c.bucket);
		int			j = i + 1;
		RowKey		rk;

		CHECK_FOR_INTERRUPTS();
		while (j < cp->ncells && cp->cells[j].account == first->account &&
			   cp->cells[j].series == first->series &&
			   STORE_DAY(cp->cells[j].c.bucket) == day)
			j++;
		memset(&rk, 0, sizeof(rk));
		rk.account = first->account;
		rk.day = day;
		rk.series = first->series;
		write_row(cp, by_rank[first->series], first->account, day, first, j - i,
				  hash_search(old_rows, &rk, HASH_FIND, NULL), &buf);
		i = j;
	}
	MemoryContextSwitchTo(old);
	if (cp->heap != NULL)
		heap_flush_new(cp->heap);
	else
		out_flush(cp);

	/* unique meters: per account */
	if (any_unique)
	{
		for (int i = 0; i < cp->ncells;)
		{
			int			j = i + 1;

			while (j < cp->ncells && cp->cells[j].account == cp->cells[i].account)
				j++;
			old = MemoryContextSwitchTo(cp->batch_cxt);
			fold_unique(cp, by_rank, &cp->cells[i], j - i);
			MemoryContextSwitchTo(old);
			i = j;
		}
	}
}

/*
 * take_deltas_sql
 *		Take the deltas out with DELETE ... RETURNING through a cursor
 *		(Citus: the statement reaches every shard) and fold them in batches.
 */
static void
take_deltas_sql(Compaction *cp)
{
	SPIPlanPtr	plan;
	Portal		portal;

	plan = SPI_prepare("DELETE FROM billing.usage_deltas RETURNING account_id, seq, cells", 0,
					   NULL);
	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	portal = SPI_cursor_open("billing_compact_deltas", plan, NULL, NULL, false);
	for (;;)
	{
		SPITupleTable *tt;
		uint64		n;

		SPI_cursor_fetch(portal, true, FETCH_ROWS);
		tt = SPI_tuptable;
		n = SPI_processed;
		if (n == 0)
			break;
		for (uint64 i = 0; i < n; i++)
		{
			HeapTuple	tup = tt->vals[i];
			TupleDesc	desc = tt->tupdesc;
			bool		null_acc,
						null_seq,
						null_cells;
			Datum		acc = SPI_getbinval(tup, desc, 1, &null_acc);
			Datum		seq = SPI_getbinval(tup, desc, 2, &null_seq);
			Datum		cells = SPI_getbinval(tup, desc, 3, &null_cells);

			if (null_acc || null_cells)
				continue;
			add_delta_row(cp, DatumGetInt64(acc), null_seq,
						  null_seq ? 0 : DatumGetInt64(seq), DatumGetByteaPP(cells));
			/* a batch holds what fits in maintenance_work_mem */
			if (batch_bytes(cp) >= cp->limit)
			{
				batch_fold(cp);
				batch_begin(cp);
			}
		}
		SPI_freetuptable(tt);
	}
	SPI_cursor_close(portal);
}

/*
 * take_deltas_heap
 *		One node: read the deltas straight from the heap of usage_deltas,
 *		with a snapshot taken now (after the lock: what an earlier
 *		compaction deleted is gone), deleting each row read, and fold them
 *		in batches.  Rows appended after the snapshot stay for the next
 *		compaction.
 */
static void
take_deltas_heap(Compaction *cp)
{
	Relation	rel = table_open(billing_relid("usage_deltas"), RowExclusiveLock);
	Snapshot	snap = RegisterSnapshot(GetLatestSnapshot());
	TableScanDesc scan = table_beginscan(rel, snap, 0, NULL);
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	AttrNumber	att_acc = get_attnum(RelationGetRelid(rel), "account_id");
	AttrNumber	att_seq = get_attnum(RelationGetRelid(rel), "seq");
	AttrNumber	att_cells = get_attnum(RelationGetRelid(rel), "cells");

	if (att_acc == InvalidAttrNumber || att_seq == InvalidAttrNumber ||
		att_cells == InvalidAttrNumber)
		elog(ERROR, "billing.usage_deltas does not have the columns compaction reads");
	while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		bool		null_acc,
					null_seq,
					null_cells;
		Datum		acc = slot_getattr(slot, att_acc, &null_acc);
		Datum		seq = slot_getattr(slot, att_seq, &null_seq);
		Datum		cells = slot_getattr(slot, att_cells, &null_cells);

		CHECK_FOR_INTERRUPTS();
		if (!null_acc && !null_cells)
		{
			MemoryContext old = MemoryContextSwitchTo(cp->row_cxt);

			add_delta_row(cp, DatumGetInt64(acc), null_seq,
						  null_seq ? 0 : DatumGetInt64(seq), DatumGetByteaPP(cells));
			MemoryContextSwitchTo(old);
			MemoryContextReset(cp->row_cxt);
		}
		simple_heap_delete(rel, &slot->tts_tid);
		/* a batch holds what fits in maintenance_work_mem */
		if (batch_bytes(cp) >= cp->limit)
		{
			batch_fold(cp);
			batch_begin(cp);
		}
	}
	ExecDropSingleTupleTableSlot(slot);
	table_endscan(scan);
	UnregisterSnapshot(snap);
	table_close(rel, NoLock);
}

/*
 * billing_compact_usage
 *		billing.compact_usage(): see the top of the file.
 */
Datum
billing_compact_usage(PG_FUNCTION_ARGS)
{
	Compaction	cp;
	MemoryContext cxt = CurrentMemoryContext;
	int			ret;

	memset(&cp, 0, sizeof(cp));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/* one compaction at a time; concurrent ingest goes on (it only appends) */
	ret = SPI_execute("SELECT pg_catalog.pg_advisory_xact_lock(1651074162, 1)", false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "pg_advisory_xact_lock failed: %s", SPI_result_code_string(ret));
	load_meters(&cp, cxt);
	cp.batch_cxt = AllocSetContextCreate(cxt, "billing compaction batch",
										 ALLOCSET_DEFAULT_SIZES);
	cp.row_cxt = AllocSetContextCreate(cxt, "billing compaction row",
									   ALLOCSET_DEFAULT_SIZES);
	cp.cells_cxt = AllocSetContextCreate(cxt, "billing compaction cells",
										 ALLOCSET_DEFAULT_SIZES);
	cp.limit = (Size) maintenance_work_mem * 1024;
	batch_begin(&cp);
	/* one node: usage_days is written straight into its heap and index */
	if (!billing_distributed())
		cp.heap = heap_begin();

	if (cp.heap != NULL)
		take_deltas_heap(&cp);
	else
		take_deltas_sql(&cp);
	batch_fold(&cp);
	if (cp.heap != NULL)
		heap_end(cp.heap);
	MemoryContextDelete(cp.batch_cxt);
	MemoryContextDelete(cp.row_cxt);
	MemoryContextDelete(cp.cells_cxt);
	SPI_finish();
	PG_RETURN_INT64(cp.folded);
}
