/*
 * ingest.h
 *		Private header of usage ingest: billing.record, the metered-table
 *		triggers, billing.ingest and billing.report_cumulative.
 *
 * Every path validates a usage report the same way (known meter, finite
 * quantity, non-negative unless the meter is max/last, timestamp inside the
 * meter's late window and at most 5 minutes ahead), claims its event id in
 * billing.dedupe_keys in the same transaction as the count, and adds it to
 * the bucket counters.
 *
 * Counting never updates a row at ingest time.  Reports are accumulated in
 * backend memory per (account, meter, dimension, bucket) and written as
 * delta rows into billing.usage_deltas with a multi-insert when the
 * statement ends (or earlier, when the accumulator outgrows work_mem).
 * Readers add billing.usage_buckets and billing.usage_deltas; the function
 * billing.compact_usage() folds deltas into the buckets.  Many sessions
 * writing the same hot bucket therefore never wait for each other.
 *
 * The accumulator of the metered-table triggers lives from the first row of
 * a statement until its AFTER STATEMENT trigger flushes it.  One
 * accumulator is kept per subtransaction, so that a subtransaction that
 * aborts drops exactly the reports it made; a commit that would leave a
 * report unflushed is refused.
 *
 * One job per file, each owning its part of IngestState:
 *
 *		ingest.c			SQL entry points record, ingest, report_cumulative
 *		ingest_trigger.c	metered-table triggers, their accumulators per
 *							subtransaction, transaction callbacks; the
 *							COPY hook's counting and storing loops
 *		ingest_accum.c		quantities, validating a report, the counter
 *							cells (Accum)
 *		ingest_claim.c		the queue of event ids and the batch claim
 *							(ClaimQueue), the SQL path
 *		ingest_claim_direct.c	the direct claim through the heap and
 *							index of billing.dedupe_keys
 *		ingest_accounts.c	account checks and the accounts a statement
 *							has checked (KnownAccounts)
 *		ingest_flush.c		the memory budget, sorting and packing the cells
 *							into delta rows (FlushBufs), where they go
 *		ingest_deltas.c		DeltaWriter: delta rows into the heap, or
 *							through Citus
 *		ingest_spill.c		delta rows of a statement's earlier flushes on
 *							tape, and their merge (RunSet)
 *		ingest_copy.c		COPY into a metered table, from billing's
 *							ProcessUtility hook: counted without the
 *							triggers, stored and counted without the
 *							transition table, or PostgreSQL's CopyFrom
 *		copy_input.c		that COPY's readers of ISO timestamps and
 *							integer quantities
 */
#ifndef BILLING_INGEST_H
#define BILLING_INGEST_H

#include "postgres.h"

#include "commands/copy.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/hsearch.h"
#include "utils/logtape.h"
#include "utils/numeric.h"
#include "utils/relcache.h"
#include "utils/reltrigger.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "decimal.h"

/* quantities are accumulated as fixed point with this many fraction digits */
#define QTY_SCALE			20
/* longest dimension and event id: both are index keys (billing.usage_buckets, billing.dedupe_keys) */
#define MAX_DIMENSION_LEN	256
#define MAX_EVENT_ID_LEN	512
/* how far into the future a report may be stamped */
#define FUTURE_SLACK_USEC	(5 * USECS_PER_MINUTE)
/* runs of delta rows a statement keeps on tape before merging them */
#define MAX_RUNS			64
/* rows written per multi-insert batch (delta rows, dedupe claims) */
#define WRITE_BATCH			1000

/*
 * An exact quantity: fixed point (value / 10^QTY_SCALE) when it fits,
 * numeric otherwise.
 */
typedef struct Qty
{
	bool		isdec;
	int128_t	dec;
	Numeric		num;
} Qty;

/* a meter as used by one accumulator, with its cut-offs for this xact */
typedef struct MeterSlot
{
	char		name[METER_NAME_LEN];	/* hash key */
	int32		id;				/* index in Accum.slots */
	int			namelen;
	MeterDef	def;
	TimestampTz oldest;			/* now() - late_window */
	TimestampTz expires;		/* now() + dedupe_window */
} MeterSlot;

/* a dimension string, interned */
typedef struct DimEntry
{
	uint32		hash;			/* hash key part 1 */
	int32		id;
	char	   *str;
	int			len;
} DimEntry;

/* key of one counter cell; 24 bytes without padding */
typedef struct BucketKey
{
	int64		account_id;
	TimestampTz bucket_start;
	int32		meter;			/* MeterSlot.id */
	int32		dim;			/* index in Accum.dims */
} BucketKey;

/*
 * One counter cell, 64 bytes: the cell table of a statement holds as many
 * cells as work_mem allows, and each cell it cannot hold is written again
 * by a later flush (and folded again by compaction), so the cell is packed.
 * Its quantity is a Qty kept in 16 bytes (the fixed point as two words, so
 * the cell needs no 16-byte alignment, or the numeric); read and written
 * with cell_qty and cell_set_qty.  last_ord is the arrival order within the
 * cell table (Accum.nreports, which restarts when the table is flushed and
 * empty, and forces a flush before it would pass PG_INT32_MAX).
 */
typedef struct BucketAcc
{
	BucketKey	key;
	int64		events;
	union
	{
		uint64		dec[2];		/* isdec: the int128, as two words */
		Numeric		num;		/* else the numeric, in Accum.cxt */
	}			q;
	TimestampTz last_ts;		/* last meters: timestamp of value */
	int32		last_ord;		/* last meters: arrival order of value */
	char		status;			/* simplehash's slot status */
	bool		isdec;
} BucketAcc;

StaticAssertDecl(sizeof(BucketAcc) == 64, "a counter cell is 64 bytes");

/* the most reports a cell table takes before it is flushed */
#define MAX_TABLE_REPORTS	PG_INT32_MAX

/* the quantity of a cell, as a Qty (a numeric stays the cell's) */
static inline void
cell_qty(const BucketAcc *c, Qty *q)
{
	q->isdec = c->isdec;
	if (c->isdec)
	{
		memcpy(&q->dec, c->q.dec, sizeof(q->dec));
		q->num = NULL;
	}
	else
	{
		q->dec = 0;
		q->num = c->q.num;
	}
}

/* set the quantity of a cell (a numeric becomes the cell's) */
static inline void
cell_set_qty(BucketAcc *c, const Qty *q)
{
	c->isdec = q->isdec;
	if (q->isdec)
		memcpy(c->q.dec, &q->dec, sizeof(c->q.dec));
	else
		c->q.num = q->num;
}

/*
 * bucketkey_hash
 *		Hash of a cell's key, every input bit reaching every output bit.
 */
static inline uint32
bucketkey_hash(const BucketKey *k)
{
	uint64		h = (uint64) k->account_id * UINT64CONST(0x9E3779B97F4A7C15);

	h ^= (uint64) k->bucket_start * UINT64CONST(0xC2B2AE3D27D4EB4F);
	h ^= (((uint64) (uint32) k->meter << 32) | (uint32) k->dim) * UINT64CONST(0x165667B19E3779F9);
	/* the 64-bit finalizer of MurmurHash3: every input bit reaches every output bit */
	h ^= h >> 33;
	h *= UINT64CONST(0xFF51AFD7ED558CCD);
	h ^= h >> 33;
	h *= UINT64CONST(0xC4CEB9FE1A85EC53);
	h ^= h >> 33;
	return (uint32) h;
}

/* open-addressing hash table of counter cells (lib/simplehash.h): bucket_hash */
#define SH_PREFIX		bucket
#define SH_ELEMENT_TYPE	BucketAcc
#define SH_KEY_TYPE		BucketKey
#define SH_KEY			key
#define SH_HASH_KEY(tb, k)	bucketkey_hash(&(k))
#define SH_EQUAL(tb, a, b)	(memcmp(&(a), &(b), sizeof(BucketKey)) == 0)
#define SH_SCOPE		static inline
/*
 * Grow early (and so flush, see billing_flush_if_full) only on probes much
 * longer than simplehash.h would allow: a flush costs more than a long probe.
 */
#define SH_GROW_MAX_DIB	256
#define SH_GROW_MAX_MOVE	4096
#define SH_DECLARE
#define SH_DEFINE
#include "lib/simplehash.h"

/*
 * A report on its way into the cell table.  A COPY or ingest() batch of a
 * million reports over tens of thousands of cells finds each report's cell
 * at a random place of a table of megabytes: most lookups missed the CPU's
 * caches (and its TLB) and waited on memory.  billing_acc_add starts
 * loading the cell's bucket and adds the report ACC_AHEAD reports later,
 * when it has arrived.  Only reports with a 128-bit decimal quantity wait
 * (a numeric lives in the caller's memory): the cells' sums, maxima and
 * latest values do not depend on the order reports are added in.
 */
#define ACC_AHEAD	8

typedef struct AccAhead
{
	BucketKey	key;
	uint64		dec[2];			/* the quantity, as BucketAcc keeps it */
	TimestampTz ts;
	int32		ord;
	uint32		hash;
} AccAhead;

/*
 * Accum: the counters of one accumulator (ingest_accum.c), the meters and
 * dimensions they use, interned, and what was counted.
 */
typedef struct Accum
{
	MemoryContext cxt;			/* the accumulator's: holds all of it */
	MemoryContext cells_cxt;	/* a child of cxt: the cell table and the
								 * flush buffers (kept between calls of
								 * billing.ingest, see ingest.c) */
	TimestampTz now;
	HTAB	   *meters;			/* name -> MeterSlot */
	MeterSlot **slots;
	int			nslots;
	int			maxslots;
	HTAB	   *dimhash;		/* (hash, string) -> DimEntry, chained */
	DimEntry  **dims;
	int			ndims;
	int			maxdims;
	int			last_dim;		/* id of the dimension used last */
	bucket_hash *buckets;		/* BucketKey -> BucketAcc */
	AccAhead	ahead[ACC_AHEAD];	/* reports counted, not yet added to
									 * their cells (billing_acc_add) */
	int			nahead;
	int			ahead_next;		/* the oldest, when ACC_AHEAD are waiting */
	int64		counted;		/* reports counted */
	int64		nreports;		/* reports seen: their arrival order */
	bool		numeric_cells;	/* a cell may hold a numeric (to free at flush) */
} Accum;

/* a report waiting for its event id to be claimed */
typedef struct PendingRow
{
	BucketKey	key;
	Qty			value;
	TimestampTz ts;
	int64		ord;			/* arrival order within the accumulator */
	char	   *event_id;
	int			event_len;
} PendingRow;

/*
 * ClaimQueue: the reports whose event ids wait for the batch claim at the
 * next flush (ingest_claim.c), and how the last claims went.
 */
typedef struct ClaimQueue
{
	MemoryContext cxt;			/* the accumulator's */
	PendingRow *pending;
	int			npending;
	int			maxpending;
	Size		pending_bytes;	/* memory held by queued event ids */
	int64		duplicates;		/* reports dropped as duplicates */
	bool		dup_heavy;		/* the last claimed batch was mostly duplicates */
} ClaimQueue;

/*
 * DeltaRows: the delta rows of one flush, packed (ingest_flush.c), then
 * written (ingest_deltas.c) or put on tape (ingest_spill.c).
 */
typedef struct DeltaRows
{
	long		nrows;
	int64	   *accounts;		/* account, */
	Datum	   *seqs;			/* seq, */
	bool	   *noseq;			/* seq is NULL, */
	Datum	   *cells;			/* packed cells (bytea) */
} DeltaRows;

/*
 * Buffers a flush reuses (grown to the largest flush, kept with the
 * accumulator): fresh ones each flush would fault their pages in again.
 */
typedef struct FlushBufs
{
	MemoryContext cxt;			/* the accumulator's cells_cxt */
	long		cap;			/* cells (and so rows) the arrays hold */
	struct CellRef *cells;		/* the cells, sorted */
	struct CellRef *sortbuf;	/* room for as many, for sorting */
	int64	   *accounts;		/* accounts to check */
	DeltaRows	rows;			/* the delta rows, */
	int		   *row_offsets;	/* offset of each row's cells in pack */
	StringInfoData pack;
} FlushBufs;

/*
 * KnownAccounts: the accounts one statement's flushes have checked already
 * (ingest_accounts.c).
 */
typedef struct KnownAccounts
{
	MemoryContext cxt;			/* the accumulator's */
	HTAB	   *hash;			/* int64 -> int64; NULL when empty */
	bool		checked;		/* has a flush of the statement checked? */
} KnownAccounts;

/*
 * RunSet: delta rows of earlier flushes of a statement, not written yet,
 * one sorted run per flush on a tape (ingest_spill.c).
 */
typedef struct RunSet
{
	MemoryContext cxt;			/* holds the tapes and their buffers */
	LogicalTapeSet *tapes;
	LogicalTape *runs[MAX_RUNS];
	int			nruns;
} RunSet;

/*
 * IngestState: one accumulator, from the first report to the last flush.
 * Everything hangs off ctx.
 */
typedef struct IngestState
{
	MemoryContext ctx;
	Accum		acc;
	ClaimQueue	claims;
	FlushBufs	flush;
	KnownAccounts known;
	RunSet		runs;
} IngestState;

/*
 * How billing_report treats an event id.
 */
typedef enum ReportMode
{
	MODE_QUEUE,					/* count later: claim with the batch at flush */
	MODE_CLAIM_NOW,				/* claim now, count if claimed */
	MODE_CLAIM_ONLY,			/* claim now, do not count (an AFTER trigger will) */
	MODE_COUNT_ONLY				/* count, the id was claimed before */
} ReportMode;

/*
 * Outcome of one report.
 */
typedef enum ReportResult
{
	REPORT_COUNTED,
	REPORT_DUPLICATE,
	REPORT_PENDING				/* waits for its claim at the next flush */
} ReportResult;

/*
 * DeltaWriter: where delta rows go (ingest_deltas.c).  add queues one row
 * and returns true when every row queued so far has been written (the
 * caller may then free their values, which must stay valid until then);
 * close writes the rest and frees the writer.
 */
typedef struct DeltaWriter DeltaWriter;
struct DeltaWriter
{
	bool		(*add) (DeltaWriter *w, int64 account_id, bool has_seq, int64 seq,
						Datum cells);
	void		(*close) (DeltaWriter *w);
};

/* order of two byte strings: bytewise, then the shorter first */
static inline int
bytes_cmp(const char *a, int alen, const char *b, int blen)
{
	int			c = memcmp(a, b, Min(alen, blen));

	return c != 0 ? c : alen - blen;
}

/*
 * The memory the cell table may take: all of the budget, or a quarter
 * while event ids are queued (the queue takes the rest).
 */
static inline Size
cells_room(IngestState *st, Size budget)
{
	return st->claims.npending > 0 ? budget / 4 : budget;
}

/* would the cell table, about to double, outgrow its room? */
static inline bool
cells_at_limit(IngestState *st, Size budget)
{
	/* (the reports still on their way may each make a cell) */
	return st->acc.buckets->members + st->acc.nahead + 1 >=
		st->acc.buckets->grow_threshold &&
		(Size) st->acc.buckets->size * 2 * sizeof(BucketAcc) > cells_room(st, budget);
}

/* ingest.c */
extern IngestState *billing_ingest_create(MemoryContext parent, uint32 ncells);

/* ingest_accum.c */
extern void billing_acc_init(Accum *acc, MemoryContext cxt, MemoryContext cells_cxt,
							 bucket_hash *cells, uint32 ncells);
extern MeterSlot *billing_acc_slot(Accum *acc, const char *name, int len);
extern int32 billing_acc_dim(Accum *acc, const char *s, int len);
extern void billing_acc_add(Accum *acc, const BucketKey *key, const Qty *v,
							TimestampTz ts, int64 ord);
extern void billing_acc_settle(Accum *acc);
extern void billing_acc_discard(Accum *acc);
extern void billing_qty_from_datum(Datum d, Oid type, Qty *q, bool *notfinite);
extern void billing_qty_store(Qty *dst, const Qty *src, MemoryContext cxt);
extern ReportResult billing_report(IngestState *st, int64 account_id,
								   const char *meter, int meterlen,
								   Datum qty, Oid qtytype, TimestampTz ts,
								   const char *event_id, int event_len,
								   const char *dim, int dimlen, ReportMode mode);

/* ingest_claim.c */
extern void billing_claim_queue(ClaimQueue *q, const BucketKey *key, const Qty *v,
								TimestampTz ts, int64 ord,
								const char *event_id, int event_len);
extern bool billing_claim_now(ClaimQueue *q, int64 account_id, const MeterSlot *slot,
							  const char *id, int len);
extern void billing_claim_pending(IngestState *st);

/* ingest_claim_direct.c */
extern bool billing_claim_direct(ClaimQueue *q, const Accum *acc, const int *first,
								 int nkeys, bool *won);

/* ingest_accounts.c */
extern void billing_accounts_cache_init(void);
extern void billing_check_accounts(const int64 *accounts, long n);
extern void billing_check_new_accounts(KnownAccounts *known, int64 *accounts, long n);
extern void billing_forget_accounts(KnownAccounts *known);

/* ingest_flush.c */
extern void billing_flush(IngestState *st);
extern void billing_flush_if_full(IngestState *st);
extern void billing_flush_cells(IngestState *st, bool final);

/* ingest_trigger.c */
extern PGDLLEXPORT Datum billing_meter_row(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum billing_meter_flush(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum billing_meter_after_rows(PG_FUNCTION_ARGS);
extern void billing_meter_copy(Relation rel, Trigger *row_trigger, CopyFromState cstate);
extern uint64 billing_meter_copy_keep(Relation rel, Trigger *rows_trigger, CopyFromState cstate);

/* copy_input.c */
extern void billing_copy_fast_inputs(CopyFromState cstate);

/* ingest_copy.c */
extern bool billing_copy_metered(CopyStmt *stmt, const char *queryString,
								 QueryEnvironment *queryEnv, QueryCompletion *qc);

/* ingest_deltas.c */
extern DeltaWriter *billing_deltas_open(bool distributed);

/* ingest_spill.c */
extern void billing_runs_put(RunSet *rs, const DeltaRows *rows);
extern void billing_runs_merge(RunSet *rs, DeltaWriter *w);

#endif							/* BILLING_INGEST_H */
