/*
 * ingest.c
 *		Usage ingest: billing.record, the metered-table triggers,
 *		billing.ingest and billing.report_cumulative.
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
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/genam.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/extension.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "common/hashfn.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/snapmgr.h"
#include "storage/bufmgr.h"
#include "storage/lmgr.h"
#include "utils/resowner.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/logtape.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "billing.h"
#include "cells.h"
#include "decimal.h"

PG_FUNCTION_INFO_V1(billing_record);
PG_FUNCTION_INFO_V1(billing_meter_row);
PG_FUNCTION_INFO_V1(billing_meter_after_rows);
PG_FUNCTION_INFO_V1(billing_meter_flush);
PG_FUNCTION_INFO_V1(billing_ingest);
PG_FUNCTION_INFO_V1(billing_report_cumulative);
PG_FUNCTION_INFO_V1(billing_meters_changed);

/* quantities are accumulated as fixed point with this many fraction digits */
#define QTY_SCALE			20
/* longest meter name (billing.meters has the same CHECK) */
#define METER_NAME_LEN		64
/* longest dimension and event id: both are index keys (billing.usage_buckets, billing.dedupe_keys) */
#define MAX_DIMENSION_LEN	256
#define MAX_EVENT_ID_LEN	512
/* how far into the future a report may be stamped */
#define FUTURE_SLACK_USEC	(5 * USECS_PER_MINUTE)
/* runs of delta rows a statement keeps on tape before merging them */
#define MAX_RUNS			64
/* delta rows written per multi-insert batch */
#define WRITE_BATCH			1000
/* a hint to load memory into the cache ahead of use */
#if defined(__GNUC__) || defined(__clang__)
#define prefetch(p)			__builtin_prefetch(p)
#else
#define prefetch(p)			((void) 0)
#endif
/* offset from the PostgreSQL epoch (2000) back to the Unix epoch (1970) */
#define UNIX_EPOCH_USEC		((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY)

typedef enum Aggregation
{
	AGG_SUM,
	AGG_COUNT,
	AGG_MAX,
	AGG_LAST
} Aggregation;

/* a meter as defined in billing.meters */
typedef struct MeterDef
{
	char		name[METER_NAME_LEN];	/* hash key, zero padded */
	Aggregation agg;
	int64		width;			/* bucket width in microseconds */
	Interval	late_window;
	Interval	dedupe_window;
} MeterDef;

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
	int32		id;				/* index in IngestState.slots */
	int			namelen;
	MeterDef	def;
	TimestampTz oldest;			/* now() - late_window */
	TimestampTz expires;		/* now() + dedupe_window */
} MeterSlot;

/* key of one counter cell; 24 bytes without padding */
typedef struct BucketKey
{
	int64		account_id;
	TimestampTz bucket_start;
	int32		meter;			/* MeterSlot.id */
	int32		dim;			/* index in IngestState.dims */
} BucketKey;

typedef struct BucketAcc
{
	BucketKey	key;
	char		status;			/* simplehash's slot status */
	Qty			value;
	int64		events;
	TimestampTz last_ts;		/* last meters: timestamp of value */
	int64		last_ord;		/* last meters: arrival order of value */
} BucketAcc;

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

/* open-addressing hash table of counter cells (lib/simplehash.h) */
#define SH_PREFIX		cells
#define SH_ELEMENT_TYPE	BucketAcc
#define SH_KEY_TYPE		BucketKey
#define SH_KEY			key
#define SH_HASH_KEY(tb, k)	bucketkey_hash(&(k))
#define SH_EQUAL(tb, a, b)	(memcmp(&(a), &(b), sizeof(BucketKey)) == 0)
#define SH_SCOPE		static inline
#define SH_DECLARE
#define SH_DEFINE
#include "lib/simplehash.h"

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

/* a dimension string, interned */
typedef struct DimEntry
{
	uint32		hash;			/* hash key part 1 */
	int32		id;
	char	   *str;
	int			len;
} DimEntry;

/* cached column numbers of one metered table's trigger */
typedef struct TableConf
{
	Oid			tgoid;
	AttrNumber	account_att;
	AttrNumber	meter_att;
	AttrNumber	qty_att;
	AttrNumber	ts_att;
	AttrNumber	event_att;		/* 0: none */
	AttrNumber	dim_att;		/* 0: none */
	Oid			qty_type;
	bool		keep_rows;
} TableConf;

/*
 * Buffers a flush reuses (grown to the largest flush, kept with the
 * accumulator): fresh ones each flush would fault their pages in again.
 */
typedef struct FlushBufs
{
	long		cap;			/* cells (and so rows) the arrays hold */
	struct CellRef *cells;		/* the cells, sorted */
	int64	   *accounts;		/* accounts to check */
	int64	   *row_accounts;	/* delta rows: account, */
	Datum	   *row_seqs;		/* seq, */
	bool	   *row_noseq;		/* seq is NULL, */
	Datum	   *row_cells;		/* packed cells (bytea in pack) */
	int		   *row_offsets;	/* offset of each row's cells in pack */
	long		nrows;
	StringInfoData pack;
} FlushBufs;

/*
 * IngestState: one accumulator.  Everything hangs off ctx.
 */
typedef struct IngestState
{
	MemoryContext ctx;
	SubTransactionId subid;		/* owner, for the trigger accumulators */
	struct IngestState *next;	/* stack of trigger accumulators */
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
	cells_hash *buckets;		/* BucketKey -> BucketAcc */
	PendingRow *pending;
	int			npending;
	int			maxpending;
	TableConf  *tables;
	int			ntables;
	int64		counted;		/* reports counted */
	int64		duplicates;		/* reports dropped as duplicates */
	Size		pending_bytes;	/* memory held by queued event ids */
	int64		nreports;		/* reports seen: their arrival order */
	HTAB	   *known_accounts; /* accounts checked by this statement's flushes */
	FlushBufs	fb;
	bool		numeric_cells;	/* a cell may hold a numeric (to free at flush) */
	bool		claims_dup_heavy;	/* the last claimed batch was mostly duplicates */
	/* delta rows of earlier flushes of this statement, not written yet */
	LogicalTapeSet *spill;
	LogicalTape *runs[MAX_RUNS];	/* one sorted run per flush */
	int			nruns;
} IngestState;

/* trigger accumulators of the current transaction, innermost first */
static IngestState *trigger_states = NULL;

/* OIDs of the relations the hot paths open (see billing_relid) */
#define NUM_CACHED_RELS 6
static Oid	cached_rel_oids[NUM_CACHED_RELS];

/*
 * Is billing distributed by Citus (usage_deltas is a Citus table)?  -1:
 * not known yet; reset with the relation OID cache.
 */
static int	citus_mode = -1;

/* backend cache of billing.meters */
static HTAB *meter_cache = NULL;
static Oid	meters_relid = InvalidOid;

/* saved plans */
static SPIPlanPtr claim_batch_plan = NULL;
static SPIPlanPtr claim_one_plan = NULL;
static SPIPlanPtr check_accounts_plan = NULL;
static SPIPlanPtr offset_plan = NULL;
static SPIPlanPtr cumulative_insert_plan = NULL;
static SPIPlanPtr cumulative_lock_plan = NULL;
static SPIPlanPtr cumulative_update_plan = NULL;
static SPIPlanPtr citus_account_plan = NULL;
static SPIPlanPtr citus_delta_plan = NULL;

static void flush_state(IngestState *st);
static void flush_some(IngestState *st);
static void write_cells(IngestState *st, bool final);

/* ---------------------------------------------------------------------
 * Meter cache
 * ---------------------------------------------------------------------
 */

/*
 * meters_relcache_cb
 *		Drop the meter cache when billing.meters changes (its trigger sends a
 *		relcache invalidation) or on a full reset.
 */
static void
meters_relcache_cb(Datum arg, Oid relid)
{
	bool		cached = false;

	for (int i = 0; i < NUM_CACHED_RELS; i++)
		if (cached_rel_oids[i] == relid)
			cached = true;
	if (relid == InvalidOid || cached)
	{
		memset(cached_rel_oids, 0, sizeof(cached_rel_oids));
		citus_mode = -1;
	}
	if (relid == InvalidOid || relid == meters_relid)
	{
		if (meter_cache)
			hash_destroy(meter_cache);
		meter_cache = NULL;
		meters_relid = InvalidOid;
	}
}

/*
 * billing_schema_oid
 *		OID of schema billing; errors when the extension is not installed.
 */
static Oid
billing_schema_oid(void)
{
	return get_namespace_oid("billing", false);
}

/*
 * billing_relid
 *		OID of relation billing.<name>, cached for the relations the hot
 *		paths open (the cache is dropped with the meter cache, on any
 *		invalidation of one of them).
 */
static const char *const cached_rel_names[] = {
	"accounts", "accounts_pkey", "usage_deltas", "dedupe_keys", "dedupe_keys_pkey", "usage_seq"
};
StaticAssertDecl(lengthof(cached_rel_names) == NUM_CACHED_RELS,
				 "cached_rel_names and NUM_CACHED_RELS disagree");

static Oid
billing_relid(const char *name)
{
	Oid			relid;
	int			i;

	for (i = 0; i < (int) NUM_CACHED_RELS; i++)
		if (strcmp(cached_rel_names[i], name) == 0)
			break;
	if (i < (int) NUM_CACHED_RELS && OidIsValid(cached_rel_oids[i]))
		return cached_rel_oids[i];
	relid = get_relname_relid(name, billing_schema_oid());
	if (!OidIsValid(relid))
		elog(ERROR, "relation billing.%s does not exist", name);
	if (i < (int) NUM_CACHED_RELS)
		cached_rel_oids[i] = relid;
	return relid;
}

/*
 * billing_distributed
 *		Are billing's tables distributed by Citus?  Then the relations this
 *		file would open directly are shells on this node, and every access
 *		must go through statements that Citus routes to the shards.  Known
 *		once per backend, again after an invalidation of a cached relation
 *		(distributing a table sends one).
 */
static bool
billing_distributed(void)
{
	if (citus_mode < 0)
	{
		Datum		values[1];
		Oid			types[1] = {OIDOID};
		bool		isnull;
		bool		dist = false;
		Oid			deltas = billing_relid("usage_deltas");

		if (OidIsValid(get_extension_oid("citus", true)))
		{
			if (SPI_connect() != SPI_OK_CONNECT)
				elog(ERROR, "SPI_connect failed");
			values[0] = ObjectIdGetDatum(deltas);
			if (SPI_execute_with_args("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition "
									  "WHERE logicalrelid OPERATOR(pg_catalog.=) $1)",
									  1, types, values, NULL, true, 1) != SPI_OK_SELECT)
				elog(ERROR, "could not read pg_dist_partition");
			dist = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 1, &isnull));
			SPI_finish();
		}
		citus_mode = dist ? 1 : 0;
	}
	return citus_mode == 1;
}

/*
 * spi_prepare_kept
 *		Prepare and keep a plan for the Citus paths.  Citus plans statements
 *		on distributed tables per execution (pruning by the parameters), so
 *		these plans are not forced generic.
 */
static SPIPlanPtr
spi_prepare_kept(const char *sql, int nargs, Oid *types)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, types);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	SPI_keepplan(plan);
	return plan;
}

/*
 * load_meters
 *		(Re)build the backend cache of billing.meters.
 */
static void
load_meters(void)
{
	HASHCTL		ctl;
	HTAB	   *cache;
	uint64		i;

	meters_relid = billing_relid("meters");

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = METER_NAME_LEN;
	ctl.entrysize = sizeof(MeterDef);
	ctl.hcxt = TopMemoryContext;
	cache = hash_create("billing meters", 64, &ctl,
						HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute("SELECT meter, aggregation, bucket_width, late_window, "
					"dedupe_window FROM billing.meters", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read billing.meters");

	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char		key[METER_NAME_LEN];
		char	   *name = SPI_getvalue(tup, desc, 1);
		char	   *agg = SPI_getvalue(tup, desc, 2);
		bool		isnull;
		Interval   *width = DatumGetIntervalP(SPI_getbinval(tup, desc, 3, &isnull));
		MeterDef   *m;

		memset(key, 0, sizeof(key));
		strlcpy(key, name, sizeof(key));
		m = hash_search(cache, key, HASH_ENTER, NULL);
		if (strcmp(agg, "sum") == 0)
			m->agg = AGG_SUM;
		else if (strcmp(agg, "count") == 0)
			m->agg = AGG_COUNT;
		else if (strcmp(agg, "max") == 0)
			m->agg = AGG_MAX;
		else
			m->agg = AGG_LAST;
		m->width = width->time + (int64) width->day * USECS_PER_DAY;
		m->late_window = *DatumGetIntervalP(SPI_getbinval(tup, desc, 4, &isnull));
		m->dedupe_window = *DatumGetIntervalP(SPI_getbinval(tup, desc, 5, &isnull));
	}
	SPI_finish();

	if (meter_cache)
		hash_destroy(meter_cache);
	meter_cache = cache;
}

/*
 * lookup_meter
 *		The definition of a meter, or NULL when it does not exist.
 */
static MeterDef *
lookup_meter(const char *key)
{
	if (meter_cache == NULL)
		load_meters();
	return hash_search(meter_cache, key, HASH_FIND, NULL);
}

/*
 * billing_meters_changed
 *		Statement trigger on billing.meters: tell every backend (this one
 *		included, at the next command) to reload its meter cache.
 */
Datum
billing_meters_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "billing_meters_changed: not called by trigger manager");
	CacheInvalidateRelcacheByRelid(((TriggerData *) fcinfo->context)->tg_relation->rd_id);

	/*
	 * On Citus the trigger fires on a placement of the reference table
	 * (billing.meters_NNN); the caches key on billing.meters.
	 */
	if (((TriggerData *) fcinfo->context)->tg_relation->rd_id != billing_relid("meters"))
		CacheInvalidateRelcacheByRelid(billing_relid("meters"));
	return PointerGetDatum(NULL);
}

/* ---------------------------------------------------------------------
 * Quantities
 * ---------------------------------------------------------------------
 */

/*
 * qty_from_datum
 *		Read a quantity of type numeric, int2, int4 or int8.  Sets *nan or
 *		*inf when it is not finite.
 */
static void
qty_from_datum(Datum d, Oid type, Qty *q, bool *notfinite)
{
	*notfinite = false;
	q->num = NULL;
	switch (type)
	{
		case INT2OID:
			q->isdec = true;
			q->dec = (int128_t) DatumGetInt16(d) * dec_pow10[QTY_SCALE];
			return;
		case INT4OID:
			q->isdec = true;
			q->dec = (int128_t) DatumGetInt32(d) * dec_pow10[QTY_SCALE];
			return;
		case INT8OID:
			q->isdec = true;
			q->dec = (int128_t) DatumGetInt64(d) * dec_pow10[QTY_SCALE];
			return;
		default:
			{
				Numeric		n = DatumGetNumeric(d);

				if (numeric_is_nan(n) || numeric_is_inf(n))
				{
					*notfinite = true;
					q->isdec = false;
					return;
				}
				q->isdec = dec_from_numeric(n, QTY_SCALE, &q->dec);
				if (!q->isdec)
					q->num = n;
			}
	}
}

/*
 * qty_numeric
 *		The quantity as a numeric (allocated in the current context).
 */
static Numeric
qty_numeric(const Qty *q)
{
	if (q->isdec)
		return dec_to_numeric(q->dec, QTY_SCALE);
	return q->num;
}

static int
qty_sign(const Qty *q)
{
	if (q->isdec)
		return q->dec > 0 ? 1 : (q->dec < 0 ? -1 : 0);
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(q->num),
											 NumericGetDatum(int64_to_numeric(0))));
}

static int
qty_cmp(const Qty *a, const Qty *b)
{
	if (a->isdec && b->isdec)
		return a->dec < b->dec ? -1 : (a->dec > b->dec ? 1 : 0);
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp,
											 NumericGetDatum(qty_numeric(a)),
											 NumericGetDatum(qty_numeric(b))));
}

/*
 * qty_store
 *		Copy *src into *dst, keeping any numeric in cxt.
 */
static void
qty_store(Qty *dst, const Qty *src, MemoryContext cxt)
{
	if (!dst->isdec && dst->num)
		pfree(dst->num);
	*dst = *src;
	if (!src->isdec)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		dst->num = DatumGetNumeric(datumCopy(NumericGetDatum(src->num), false, -1));
		MemoryContextSwitchTo(old);
	}
}

/*
 * qty_add
 *		*acc += *v exactly, spilling to numeric when fixed point overflows.
 */
static void
qty_add(Qty *acc, const Qty *v, MemoryContext cxt)
{
	Qty			r;

	if (acc->isdec && v->isdec && dec_add(acc->dec, v->dec, &r.dec))
	{
		acc->dec = r.dec;
		return;
	}
	r.isdec = false;
	r.num = DatumGetNumeric(DirectFunctionCall2(numeric_add,
												NumericGetDatum(qty_numeric(acc)),
												NumericGetDatum(qty_numeric(v))));
	qty_store(acc, &r, cxt);
}

/* ---------------------------------------------------------------------
 * Accumulators
 * ---------------------------------------------------------------------
 */

/*
 * state_create
 *		A new, empty accumulator in a child of parent.
 */
static IngestState *
state_create(MemoryContext parent, uint32 ncells)
{
	MemoryContext ctx = AllocSetContextCreate(parent, "billing ingest",
											  ALLOCSET_DEFAULT_SIZES);
	IngestState *st = MemoryContextAllocZero(ctx, sizeof(IngestState));
	HASHCTL		ctl;

	st->ctx = ctx;
	st->now = GetCurrentTransactionStartTimestamp();

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = METER_NAME_LEN;
	ctl.entrysize = sizeof(MeterSlot);
	ctl.hcxt = ctx;
	st->meters = hash_create("billing ingest meters", 16, &ctl,
							 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(uint32);
	ctl.entrysize = sizeof(DimEntry);
	ctl.hcxt = ctx;
	st->dimhash = hash_create("billing ingest dimensions", 16, &ctl,
							  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	st->buckets = cells_create(ctx, ncells, NULL);

	return st;
}

/*
 * state_slot
 *		The accumulator's slot for a meter, given its name as bytes;
 *		raises 23503 for an unknown meter.
 */
static MeterSlot *
state_slot(IngestState *st, const char *name, int len)
{
	char		key[METER_NAME_LEN];
	MeterSlot  *slot;
	bool		found;

	/* a batch uses a handful of meters: compare before hashing */
	for (int i = 0; i < st->nslots; i++)
	{
		slot = st->slots[i];
		if (slot->namelen == len && memcmp(slot->name, name, len) == 0)
			return slot;
	}

	memset(key, 0, sizeof(key));
	if (len >= METER_NAME_LEN || len == 0 || memchr(name, '\0', len))
		ereport(ERROR,
				(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
				 errmsg("meter \"%.*s\" does not exist", Min(len, 200), name),
				 errhint("Meters are defined in billing.meters.")));
	memcpy(key, name, len);

	slot = hash_search(st->meters, key, HASH_ENTER, &found);
	if (!found)
	{
		MeterDef   *def = lookup_meter(key);
		MemoryContext old;

		if (def == NULL)
		{
			hash_search(st->meters, key, HASH_REMOVE, NULL);
			ereport(ERROR,
					(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
					 errmsg("meter \"%s\" does not exist", key),
					 errhint("Meters are defined in billing.meters.")));
		}
		slot->def = *def;
		slot->namelen = strlen(key);
		slot->oldest = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_mi_interval,
															   TimestampTzGetDatum(st->now),
															   IntervalPGetDatum(&def->late_window)));
		slot->expires = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
																TimestampTzGetDatum(st->now),
																IntervalPGetDatum(&def->dedupe_window)));
		old = MemoryContextSwitchTo(st->ctx);
		if (st->nslots == st->maxslots)
		{
			st->maxslots = st->maxslots ? st->maxslots * 2 : 8;
			st->slots = st->slots ? repalloc(st->slots, st->maxslots * sizeof(MeterSlot *))
				: palloc(st->maxslots * sizeof(MeterSlot *));
		}
		MemoryContextSwitchTo(old);
		slot->id = st->nslots;
		st->slots[st->nslots++] = slot;
	}
	return slot;
}

/*
 * state_dim
 *		Intern a dimension string; returns its id.
 */
static int32
state_dim(IngestState *st, const char *s, int len)
{
	uint32		h;
	DimEntry   *e;
	bool		found;
	MemoryContext old;

	/* most reports repeat the previous dimension (usually '') */
	if (st->ndims > 0)
	{
		e = st->dims[st->last_dim];
		if (e->len == len && memcmp(e->str, s, len) == 0)
			return e->id;
	}
	h = hash_bytes((const unsigned char *) s, len);

	/* linear probing on the hash value keeps collisions exact */
	for (;;)
	{
		e = hash_search(st->dimhash, &h, HASH_ENTER, &found);
		if (!found)
			break;
		if (e->len == len && memcmp(e->str, s, len) == 0)
		{
			st->last_dim = e->id;
			return e->id;
		}
		h++;
	}
	old = MemoryContextSwitchTo(st->ctx);
	e->str = palloc(len + 1);
	memcpy(e->str, s, len);
	e->str[len] = '\0';
	e->len = len;
	if (st->ndims == st->maxdims)
	{
		st->maxdims = st->maxdims ? st->maxdims * 2 : 8;
		st->dims = st->dims ? repalloc(st->dims, st->maxdims * sizeof(DimEntry *))
			: palloc(st->maxdims * sizeof(DimEntry *));
	}
	MemoryContextSwitchTo(old);
	e->id = st->ndims;
	st->dims[st->ndims++] = e;
	st->last_dim = e->id;
	return e->id;
}

/*
 * bucket_of
 *		Start of the bucket of width usec that holds ts, aligned to
 *		multiples of the width since 1970-01-01 00:00 UTC.
 */
static TimestampTz
bucket_of(TimestampTz ts, int64 width)
{
	int64		t = ts + UNIX_EPOCH_USEC;
	int64		r = t % width;

	if (r < 0)
		r += width;
	return ts - r;
}

/*
 * accumulate
 *		Add one report (already validated and claimed) to the counters.
 */
static void
accumulate(IngestState *st, const BucketKey *key, const Qty *v, TimestampTz ts,
		   int64 ord)
{
	BucketAcc  *acc;
	bool		found;
	Aggregation agg = st->slots[key->meter]->def.agg;

	acc = cells_insert(st->buckets, *key, &found);
	if (!found)
	{
		acc->events = 1;
		acc->last_ts = ts;
		acc->last_ord = ord;
		acc->value.isdec = true;
		acc->value.dec = 0;
		acc->value.num = NULL;
		if (agg == AGG_COUNT)
			acc->value.dec = dec_pow10[QTY_SCALE];
		else
			qty_store(&acc->value, v, st->ctx);
		st->numeric_cells |= !acc->value.isdec;
		st->counted++;
		return;
	}

	if (pg_add_s64_overflow(acc->events, 1, &acc->events))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("event count of a usage bucket is out of range")));
	st->counted++;

	switch (agg)
	{
		case AGG_SUM:
			qty_add(&acc->value, v, st->ctx);
			break;
		case AGG_COUNT:
			{
				Qty			one = {true, dec_pow10[QTY_SCALE], NULL};

				qty_add(&acc->value, &one, st->ctx);
			}
			break;
		case AGG_MAX:
			if (qty_cmp(v, &acc->value) > 0)
				qty_store(&acc->value, v, st->ctx);
			break;
		case AGG_LAST:
			/* on a tie of timestamps the later arrival wins */
			if (ts > acc->last_ts || (ts == acc->last_ts && ord > acc->last_ord))
			{
				qty_store(&acc->value, v, st->ctx);
				acc->last_ts = ts;
				acc->last_ord = ord;
			}
			break;
	}
	st->numeric_cells |= !acc->value.isdec;
}

/*
 * claim_one
 *		Claim one event id now (INSERT ... ON CONFLICT DO NOTHING); true if
 *		this transaction claimed it.
 */
static bool
claim_one(int64 account_id, const MeterSlot *slot, const char *id, int len)
{
	Datum		values[4];
	Oid			types[4] = {INT8OID, TEXTOID, TEXTOID, TIMESTAMPTZOID};
	bool		claimed;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (claim_one_plan == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare_cursor(
									   "INSERT INTO billing.dedupe_keys (account_id, meter, event_id, expires_at) "
									   "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
									   4, types, CURSOR_OPT_GENERIC_PLAN);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		claim_one_plan = plan;
	}
	values[0] = Int64GetDatum(account_id);
	values[1] = PointerGetDatum(cstring_to_text(slot->name));
	values[2] = PointerGetDatum(cstring_to_text_with_len(id, len));
	values[3] = TimestampTzGetDatum(slot->expires);
	if (SPI_execute_plan(claim_one_plan, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not claim event id");
	claimed = (SPI_processed == 1);
	SPI_finish();
	return claimed;
}

/*
 * How add_report treats an event id.
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
 * add_report
 *		Validate one usage report, then, by mode: count it or queue its event
 *		id for the batch claim at flush (MODE_QUEUE), claim its id now and
 *		count it if claimed (MODE_CLAIM_NOW), only claim (MODE_CLAIM_ONLY),
 *		or only count (MODE_COUNT_ONLY).  Raises the SPEC section 3 errors
 *		for bad input.
 */
static ReportResult
add_report(IngestState *st, int64 account_id, const char *meter, int meterlen,
		   Datum qty, Oid qtytype, TimestampTz ts,
		   const char *event_id, int event_len,
		   const char *dim, int dimlen, ReportMode mode)
{
	int64		ord = ++st->nreports;
	MeterSlot  *slot = state_slot(st, meter, meterlen);
	BucketKey	key;
	Qty			v;
	bool		notfinite;

	qty_from_datum(qty, qtytype, &v, &notfinite);
	if (notfinite)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("usage quantity must be finite"),
				 errdetail("Meter \"%s\", account %lld.", slot->name, (long long) account_id)));
	if (!v.isdec)
		billing_check_quantity(v.num, slot->name, account_id);
	if ((slot->def.agg == AGG_SUM || slot->def.agg == AGG_COUNT) && qty_sign(&v) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("usage quantity must not be negative"),
				 errdetail("Meter \"%s\" adds quantities; account %lld reported %s.",
						   slot->name, (long long) account_id,
						   DatumGetCString(DirectFunctionCall1(numeric_out,
															   NumericGetDatum(qty_numeric(&v)))))));
	if (ts < slot->oldest || ts > st->now + FUTURE_SLACK_USEC ||
		TIMESTAMP_NOT_FINITE(ts))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_DATETIME_FORMAT),
				 errmsg("usage timestamp %s is outside the accepted window",
						TIMESTAMP_NOT_FINITE(ts) ? "(infinite)" : pstrdup(timestamptz_to_str(ts))),
				 errdetail("Meter \"%s\" accepts reports from %s (its late window) to 5 minutes ahead of %s.",
						   slot->name, pstrdup(timestamptz_to_str(slot->oldest)),
						   pstrdup(timestamptz_to_str(st->now)))));
	if (account_id <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
				 errmsg("account %lld does not exist", (long long) account_id)));
	if (dimlen > MAX_DIMENSION_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("usage dimension is too long"),
				 errdetail("A dimension has at most %d bytes; this one has %d.",
						   MAX_DIMENSION_LEN, dimlen)));
	if (event_id != NULL && event_len > MAX_EVENT_ID_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event id is too long"),
				 errdetail("An event id has at most %d bytes; this one has %d.",
						   MAX_EVENT_ID_LEN, event_len)));

	memset(&key, 0, sizeof(key));
	key.account_id = account_id;
	key.meter = slot->id;
	key.dim = state_dim(st, dim, dimlen);
	key.bucket_start = bucket_of(ts, slot->def.width);

	if (event_id != NULL && mode != MODE_COUNT_ONLY)
	{
		if (mode != MODE_QUEUE)
		{
			if (!claim_one(account_id, slot, event_id, event_len))
			{
				st->duplicates++;
				return REPORT_DUPLICATE;
			}
		}
		else
		{
			PendingRow *p;
			MemoryContext old = MemoryContextSwitchTo(st->ctx);

			if (st->npending == st->maxpending)
			{
				st->maxpending = st->maxpending ? st->maxpending * 2 : 256;
				st->pending = st->pending ? repalloc(st->pending, st->maxpending * sizeof(PendingRow))
					: palloc(st->maxpending * sizeof(PendingRow));
			}
			p = &st->pending[st->npending++];
			p->key = key;
			p->value.isdec = true;
			p->value.num = NULL;
			qty_store(&p->value, &v, st->ctx);
			p->ts = ts;
			p->ord = ord;
			p->event_id = palloc(event_len + 1);
			memcpy(p->event_id, event_id, event_len);
			p->event_id[event_len] = '\0';
			p->event_len = event_len;
			st->pending_bytes += sizeof(PendingRow) + event_len + 1 + 16;
			MemoryContextSwitchTo(old);
			return REPORT_PENDING;
		}
	}
	if (mode != MODE_CLAIM_ONLY)
		accumulate(st, &key, &v, ts, ord);
	return REPORT_COUNTED;
}

/*
 * cells_room
 *		The memory the cell table may take: all of the budget, or a
 *		quarter while event ids are queued (the queue takes the rest).
 */
static inline Size
cells_room(IngestState *st, Size budget)
{
	return st->npending > 0 ? budget / 4 : budget;
}

/* would the cell table, about to double, outgrow its room? */
static inline bool
cells_at_limit(IngestState *st, Size budget)
{
	return st->buckets->members + 1 >= st->buckets->grow_threshold &&
		(Size) st->buckets->size * 2 * sizeof(BucketAcc) > cells_room(st, budget);
}

/*
 * maybe_flush
 *		Flush early when the accumulator has grown past work_mem, so memory
 *		stays bounded however many rows a statement sends.
 */
static void
maybe_flush(IngestState *st)
{
	Size		budget = (Size) work_mem * 1024;

	/*
	 * Flush before the cell table would double past its room, or when the
	 * queued event ids fill the rest of the budget.  The claim counts the
	 * winners into the cell table and writes it whenever it fills (see
	 * claim_pending): big queues make the claim cheaper per id.
	 */
	if (cells_at_limit(st, budget) || st->pending_bytes > budget - budget / 4)
		flush_some(st);

	/*
	 * A table bigger than its room (simplehash doubles early when probes
	 * run long, and the room shrinks when ids start to queue): flush and
	 * start again from a small table.
	 */
	if ((Size) st->buckets->size * sizeof(BucketAcc) > cells_room(st, budget))
	{
		Size		room = cells_room(st, budget);
		uint32		size = 64;

		flush_some(st);
		cells_destroy(st->buckets);
		/* the largest table that fits the room it lacked (at least 64 cells) */
		while ((Size) size * 2 * sizeof(BucketAcc) <= room)
			size *= 2;
		st->buckets = cells_create(st->ctx, size / 2, NULL);
	}
}

/* ---------------------------------------------------------------------
 * Flushing
 * ---------------------------------------------------------------------
 */

/*
 * account_exists
 *		Is there a row for account_id in billing.accounts (as the current
 *		command sees it)?  A direct probe of the primary key.
 */
static bool
account_exists(int64 account_id)
{
	Relation	rel = table_open(billing_relid("accounts"), AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	bool		found;

	ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(account_id));
	scan = systable_beginscan(rel, billing_relid("accounts_pkey"), true,
							  GetActiveSnapshot(), 1, &key);
	found = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return found;
}

static int
int64_cmp(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : (x > y ? 1 : 0);
}

/*
 * check_accounts_citus
 *		check_accounts on Citus: billing.accounts is distributed, so ask
 *		Citus (one router query for one account; for several, one query
 *		pruned to their shards) and find the first missing id.
 */
static void
check_accounts_citus(const int64 *accounts, long n)
{
	int64	   *ids = palloc(n * sizeof(int64));
	int64	   *found;
	long		i,
				j;
	long		m = 0;
	long		nfound;
	int64		missing = 0;
	bool		is_missing = false;

	for (i = 0; i < n; i++)
		if (i == 0 || accounts[i] != accounts[i - 1])
			ids[m++] = accounts[i];

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (m == 1)
	{
		Datum		values[1];
		Oid			types[1] = {INT8OID};

		if (citus_account_plan == NULL)
			citus_account_plan = spi_prepare_kept(
												  "SELECT 1 FROM billing.accounts "
												  "WHERE account_id OPERATOR(pg_catalog.=) $1",
												  1, types);
		values[0] = Int64GetDatum(ids[0]);
		if (SPI_execute_plan(citus_account_plan, values, NULL, true, 1) != SPI_OK_SELECT)
			elog(ERROR, "could not check accounts");
		if (SPI_processed == 0)
		{
			is_missing = true;
			missing = ids[0];
		}
	}
	else
	{
		Datum	   *elems = palloc(m * sizeof(Datum));
		Datum		values[1];
		Oid			types[1] = {INT8ARRAYOID};

		for (i = 0; i < m; i++)
			elems[i] = Int64GetDatum(ids[i]);
		values[0] = PointerGetDatum(construct_array(elems, m, INT8OID, 8, true, TYPALIGN_DOUBLE));
		/* planned with the values, so that Citus prunes to their shards */
		if (SPI_execute_with_args("SELECT account_id FROM billing.accounts "
								  "WHERE account_id OPERATOR(pg_catalog.=) ANY ($1)",
								  1, types, values, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not check accounts");
		nfound = (long) SPI_processed;
		found = palloc(Max(nfound, 1) * sizeof(int64));
		for (i = 0; i < nfound; i++)
		{
			bool		isnull;

			found[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
												   SPI_tuptable->tupdesc, 1, &isnull));
		}
		qsort(found, nfound, sizeof(int64), int64_cmp);
		for (i = 0, j = 0; i < m; i++)
		{
			while (j < nfound && found[j] < ids[i])
				j++;
			if (j >= nfound || found[j] != ids[i])
			{
				is_missing = true;
				missing = ids[i];
				break;
			}
		}
		pfree(found);
		pfree(elems);
	}
	SPI_finish();
	pfree(ids);
	if (is_missing)
		ereport(ERROR,
				(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
				 errmsg("account %lld does not exist", (long long) missing),
				 errhint("Accounts are defined in billing.accounts.")));
}

/*
 * check_accounts
 *		Raise 23503 when one of the n account ids (sorted, so that repeats
 *		are adjacent) does not exist in billing.accounts.
 */
static void
check_accounts(const int64 *accounts, long n)
{
	Datum	   *ids;
	long		i;
	int			m = 0;
	Datum		values[1];
	Oid			types[1] = {INT8ARRAYOID};

	if (n == 0)
		return;
	if (billing_distributed())
	{
		check_accounts_citus(accounts, n);
		return;
	}
	if (accounts[0] == accounts[n - 1])
	{
		/* one account (record, report_cumulative, small batches) */
		if (!account_exists(accounts[0]))
			ereport(ERROR,
					(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
					 errmsg("account %lld does not exist", (long long) accounts[0]),
					 errhint("Accounts are defined in billing.accounts.")));
		return;
	}
	ids = palloc(n * sizeof(Datum));
	for (i = 0; i < n; i++)
		if (i == 0 || accounts[i] != accounts[i - 1])
			ids[m++] = Int64GetDatum(accounts[i]);
	values[0] = PointerGetDatum(construct_array(ids, m, INT8OID, 8, true, TYPALIGN_DOUBLE));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (check_accounts_plan == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare_cursor(
									   "SELECT a FROM pg_catalog.unnest($1) AS a "
									   "WHERE NOT EXISTS (SELECT 1 FROM billing.accounts c "
									   "WHERE c.account_id OPERATOR(pg_catalog.=) a) LIMIT 1",
									   1, types, CURSOR_OPT_GENERIC_PLAN);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		check_accounts_plan = plan;
	}
	if (SPI_execute_plan(check_accounts_plan, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not check accounts");
	if (SPI_processed > 0)
	{
		bool		isnull;
		int64		missing = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
														  SPI_tuptable->tupdesc, 1, &isnull));

		ereport(ERROR,
				(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
				 errmsg("account %lld does not exist", (long long) missing),
				 errhint("Accounts are defined in billing.accounts.")));
	}
	SPI_finish();
	pfree(ids);
}

/* order of two byte strings: bytewise, then the shorter first */
static inline int
bytes_cmp(const char *a, int alen, const char *b, int blen)
{
	int			c = memcmp(a, b, Min(alen, blen));

	return c != 0 ? c : alen - blen;
}

/* order pending rows by (account, meter name, event id): claims in one order */
static IngestState *sort_state;

static int
pending_cmp(const void *a, const void *b)
{
	const PendingRow *x = a;
	const PendingRow *y = b;
	int			c;

	if (x->key.account_id != y->key.account_id)
		return x->key.account_id < y->key.account_id ? -1 : 1;
	if (x->key.meter != y->key.meter)
	{
		const MeterSlot *xm = sort_state->slots[x->key.meter];
		const MeterSlot *ym = sort_state->slots[y->key.meter];

		c = bytes_cmp(xm->name, xm->namelen, ym->name, ym->namelen);
		if (c != 0)
			return c;
	}
	c = bytes_cmp(x->event_id, x->event_len, y->event_id, y->event_len);
	if (c != 0)
		return c;
	return x->ord < y->ord ? -1 : (x->ord > y->ord ? 1 : 0);
}

/* true when two queued reports carry the same (account, meter, event id) */
static bool
pending_same_key(const PendingRow *x, const PendingRow *y)
{
	return x->key.account_id == y->key.account_id &&
		x->key.meter == y->key.meter &&
		x->event_len == y->event_len &&
		memcmp(x->event_id, y->event_id, x->event_len) == 0;
}

#define CLAIM_BATCH_SQL \
	"INSERT INTO billing.dedupe_keys (account_id, meter, event_id, expires_at) " \
	"SELECT * FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), " \
	"pg_catalog.unnest($3), pg_catalog.unnest($4)) " \
	"ON CONFLICT DO NOTHING " \
	"RETURNING account_id, meter, event_id"

/*
 * claim_keys_spi
 *		Claim the keys first[0..nkeys) with one INSERT ... ON CONFLICT DO
 *		NOTHING RETURNING; set won[i] for the keys this transaction claimed.
 *		This path never fails on a concurrent claim of the same key.
 */
static void
claim_keys_spi(IngestState *st, const int *first, int nkeys, bool *won)
{
	Datum	   *accts = palloc(nkeys * sizeof(Datum));
	Datum	   *meters = palloc(nkeys * sizeof(Datum));
	Datum	   *ids = palloc(nkeys * sizeof(Datum));
	Datum	   *exp = palloc(nkeys * sizeof(Datum));
	Datum		values[4];
	Oid			types[4] = {INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID};
	PendingRow *ret;
	int			nret;
	int			j,
				k;

	for (j = 0; j < nkeys; j++)
	{
		PendingRow *p = &st->pending[first[j]];
		MeterSlot  *slot = st->slots[p->key.meter];

		accts[j] = Int64GetDatum(p->key.account_id);
		meters[j] = PointerGetDatum(cstring_to_text(slot->name));
		ids[j] = PointerGetDatum(cstring_to_text_with_len(p->event_id, p->event_len));
		exp[j] = TimestampTzGetDatum(slot->expires);
	}
	values[0] = PointerGetDatum(construct_array(accts, nkeys, INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[1] = PointerGetDatum(construct_array(meters, nkeys, TEXTOID, -1, false, TYPALIGN_INT));
	values[2] = PointerGetDatum(construct_array(ids, nkeys, TEXTOID, -1, false, TYPALIGN_INT));
	values[3] = PointerGetDatum(construct_array(exp, nkeys, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (billing_distributed())
	{
		/*
		 * Citus plans this INSERT ... SELECT only with the values bound (it
		 * then splits the rows by shard); no generic plan.  Read through a
		 * CTE: Citus counts the rows the INSERT was sent, not the ones ON
		 * CONFLICT DO NOTHING let through and RETURNING gives back, and SPI
		 * refuses that mismatch ("consistency check on SPI tuple count").
		 */
		if (SPI_execute_with_args("WITH c AS (" CLAIM_BATCH_SQL ") SELECT * FROM c",
								  4, types, values, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not claim event ids");
	}
	else
	{
		if (claim_batch_plan == NULL)
		{
			SPIPlanPtr	plan = SPI_prepare_cursor(CLAIM_BATCH_SQL, 4, types,
												  CURSOR_OPT_GENERIC_PLAN);

			if (plan == NULL)
				elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
			SPI_keepplan(plan);
			claim_batch_plan = plan;
		}
		if (SPI_execute_plan(claim_batch_plan, values, NULL, false, 0) != SPI_OK_INSERT_RETURNING)
			elog(ERROR, "could not claim event ids");
	}

	/* the claimed keys, in the caller's memory, sorted like the batch */
	nret = (int) SPI_processed;
	ret = SPI_palloc(Max(nret, 1) * sizeof(PendingRow));
	for (j = 0; j < nret; j++)
	{
		HeapTuple	tup = SPI_tuptable->vals[j];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		text	   *m = DatumGetTextPP(SPI_getbinval(tup, desc, 2, &isnull));
		text	   *id = DatumGetTextPP(SPI_getbinval(tup, desc, 3, &isnull));

		memset(&ret[j], 0, sizeof(PendingRow));
		ret[j].key.account_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		ret[j].key.meter = state_slot(st, VARDATA_ANY(m), VARSIZE_ANY_EXHDR(m))->id;
		ret[j].event_len = VARSIZE_ANY_EXHDR(id);
		ret[j].event_id = SPI_palloc(ret[j].event_len + 1);
		memcpy(ret[j].event_id, VARDATA_ANY(id), ret[j].event_len);
	}
	SPI_finish();
	qsort(ret, nret, sizeof(PendingRow), pending_cmp);

	/* merge: a key was won when it comes back from RETURNING */
	for (j = 0, k = 0; j < nkeys && k < nret; j++)
	{
		PendingRow *p = &st->pending[first[j]];

		while (k < nret && pending_cmp(&ret[k], p) < 0 && !pending_same_key(&ret[k], p))
			k++;
		if (k < nret && pending_same_key(&ret[k], p))
		{
			won[j] = true;
			k++;
		}
	}

	for (j = 0; j < nret; j++)
		pfree(ret[j].event_id);
	pfree(ret);
	pfree(accts);
	pfree(meters);
	pfree(ids);
	pfree(exp);
}

/* index tuples a merge walk may pass over before it descends the index again */
#define CLAIM_SKIP_LIMIT 64

/* compare an event id (text) with a queued one, in "C" collation order */
static int
event_id_cmp(text *t, const PendingRow *p)
{
	return bytes_cmp(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), p->event_id, p->event_len);
}

/*
 * init_claim_keys
 *		The scan keys of the dedupe_keys primary key: account and meter
 *		equal, the event id compared with id_strategy/id_proc; text in the
 *		"C" collation.  The arguments are set by the caller.
 */
static void
init_claim_keys(ScanKeyData *skey, StrategyNumber id_strategy, RegProcedure id_proc)
{
	ScanKeyInit(&skey[0], 1, BTEqualStrategyNumber, F_INT8EQ, (Datum) 0);
	ScanKeyInit(&skey[1], 2, BTEqualStrategyNumber, F_TEXTEQ, (Datum) 0);
	ScanKeyInit(&skey[2], 3, id_strategy, id_proc, (Datum) 0);
	skey[1].sk_collation = C_COLLATION_OID;
	skey[2].sk_collation = C_COLLATION_OID;
}

/*
 * mark_existing
 *		Set exists[i] for the keys first[0..nkeys) (sorted) that are in
 *		billing.dedupe_keys, committed, ours, or inserted by a transaction
 *		still in progress (then wait for it and look again).
 *
 *		The keys of one (account, meter) are looked up with one ordered
 *		index range scan from the first of them, merged against the sorted
 *		ids: a replayed batch, whose ids are all there, reads each index
 *		entry once instead of descending the index once per id.  Ids are
 *		compared in the index entries; the heap is visited only for an
 *		entry of a batch id (is that row there, or being inserted?).  When the
 *		walk passes more than CLAIM_SKIP_LIMIT entries that are not in the
 *		batch, it descends again at the next id, so sparse batches cost no
 *		more than a lookup per id.
 */
static void
mark_existing(IngestState *st, const int *first, int nkeys, bool *exists,
			  Relation heap, Relation index, MemoryContext tmp)
{
	SnapshotData dirty;
	IndexScanDesc scan;
	TupleTableSlot *slot = table_slot_create(heap, NULL);
	ScanKeyData skey[3];
	int			j = 0;

	InitDirtySnapshot(dirty);
	scan = index_beginscan(heap, index, &dirty, 3, 0);
	scan->xs_want_itup = true;	/* compare ids in the index, visit the heap on a match */
	init_claim_keys(skey, BTGreaterEqualStrategyNumber, F_TEXT_GE);

	while (j < nkeys)
	{
		PendingRow *p0 = &st->pending[first[j]];
		int			g = j + 1;
		int			k = j;
		bool		restart = true;
		bool		have = false;
		int			skipped = 0;
		MemoryContext old;

		/* the keys of this (account, meter) are first[j..g) */
		while (g < nkeys &&
			   st->pending[first[g]].key.account_id == p0->key.account_id &&
			   st->pending[first[g]].key.meter == p0->key.meter)
			g++;

		old = MemoryContextSwitchTo(tmp);
		skey[0].sk_argument = Int64GetDatum(p0->key.account_id);
		skey[1].sk_argument = PointerGetDatum(cstring_to_text(st->slots[p0->key.meter]->name));
		MemoryContextSwitchTo(old);

		while (k < g)
		{
			PendingRow *p = &st->pending[first[k]];
			TransactionId xwait;
			bool		isnull;
			int			c;

			if (restart)
			{
				old = MemoryContextSwitchTo(tmp);
				skey[2].sk_argument =
					PointerGetDatum(cstring_to_text_with_len(p->event_id, p->event_len));
				MemoryContextSwitchTo(old);
				index_rescan(scan, skey, 3, NULL, 0);
				have = index_getnext_tid(scan, ForwardScanDirection) != NULL;
				skipped = 0;
				restart = false;
			}
			if (!have)
				break;			/* nothing at or after this id: the rest are new */

			c = event_id_cmp(DatumGetTextPP(index_getattr(scan->xs_itup, 3, scan->xs_itupdesc,
														  &isnull)), p);
			if (c == 0)
			{
				/* the id's entry: does it point to a row that is, or may be, there? */
				if (!index_fetch_heap(scan, slot))
				{
					have = index_getnext_tid(scan, ForwardScanDirection) != NULL;
					continue;	/* a dead version: look at the next entry */
				}
				/* our id, claimed by a transaction still in progress: wait, look again */
				xwait = TransactionIdIsValid(dirty.xmin) ? dirty.xmin : dirty.xmax;
				if (TransactionIdIsValid(xwait))
				{
					XactLockTableWait(xwait, heap, &slot->tts_tid, XLTW_InsertIndex);
					restart = true;
					continue;
				}
				exists[k++] = true;
				have = index_getnext_tid(scan, ForwardScanDirection) != NULL;
				skipped = 0;
			}
			else if (c > 0)
				k++;			/* the index is past this id: it is new */
			else if (++skipped > CLAIM_SKIP_LIMIT)
				restart = true;
			else
				have = index_getnext_tid(scan, ForwardScanDirection) != NULL;
		}
		MemoryContextReset(tmp);
		j = g;
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
}

/* what find_claim found */
typedef enum ClaimFound
{
	CLAIM_NONE,					/* no claim of the key */
	CLAIM_LIVE,					/* a claim, committed or made by this transaction */
	CLAIM_BUSY					/* a claim another transaction is making or deleting */
} ClaimFound;

/*
 * find_claim
 *		Look up the claim of a queued key in the dedupe_keys index, with a
 *		dirty snapshot; on CLAIM_LIVE, *found is its TID.  The entry at skip
 *		(our own new claim), when given, is passed over, and so are dead
 *		versions.
 */
static ClaimFound
find_claim(IngestState *st, Relation heap, Relation index, const PendingRow *p,
		   ItemPointer skip, TupleTableSlot *slot, ItemPointer found)
{
	SnapshotData dirty;
	IndexScanDesc scan;
	ScanKeyData skey[3];
	ItemPointer tid;
	ClaimFound	result = CLAIM_NONE;

	InitDirtySnapshot(dirty);
	init_claim_keys(skey, BTEqualStrategyNumber, F_TEXTEQ);
	skey[0].sk_argument = Int64GetDatum(p->key.account_id);
	skey[1].sk_argument = PointerGetDatum(cstring_to_text(st->slots[p->key.meter]->name));
	skey[2].sk_argument = PointerGetDatum(cstring_to_text_with_len(p->event_id, p->event_len));
	scan = index_beginscan(heap, index, &dirty, 3, 0);
	index_rescan(scan, skey, 3, NULL, 0);
	while ((tid = index_getnext_tid(scan, ForwardScanDirection)) != NULL)
	{
		if (skip && ItemPointerEquals(tid, skip))
			continue;
		if (!index_fetch_heap(scan, slot))
			continue;
		if (TransactionIdIsValid(dirty.xmin) || TransactionIdIsValid(dirty.xmax))
			result = CLAIM_BUSY;
		else
		{
			*found = slot->tts_tid;
			result = CLAIM_LIVE;
		}
		break;
	}
	index_endscan(scan);
	return result;
}

/* order of a claim row against a queued key, as pending_cmp orders keys */
static int
claim_row_cmp(int64 account, const char *meter, int mlen, const char *id, int idlen,
			  IngestState *st, const PendingRow *p)
{
	const MeterSlot *m = st->slots[p->key.meter];
	int			c;

	if (account != p->key.account_id)
		return account < p->key.account_id ? -1 : 1;
	c = bytes_cmp(meter, mlen, m->name, m->namelen);
	if (c != 0)
		return c;
	return bytes_cmp(id, idlen, p->event_id, p->event_len);
}

/* how many rows the heap walk of match_heap_run may pass without a match */
#define HEAP_RUN_MISS_LIMIT 64

/*
 * match_heap_run
 *		Mark exists[] for the keys found by walking the heap of dedupe_keys
 *		forward from the claim of the batch's first key, while its rows come
 *		in key order.  A batch claimed by one multi-insert is such a sorted
 *		run, so a replay of the same data (a retried file) finds its ids
 *		there one after another, without a descent of the index per id.
 *		Stops at the first row out of order, after HEAP_RUN_MISS_LIMIT rows
 *		without a match, or at a row another transaction is inserting or
 *		deleting (the index probe waits for those).  Keys it does not mark
 *		may still exist: the caller checks them through the index.  Returns
 *		the number of keys marked.
 */
static int
match_heap_run(IngestState *st, const int *first, int nkeys, bool *exists,
			   Relation heap, Relation index)
{
	TupleDesc	desc = RelationGetDescr(heap);
	SnapshotData dirty;
	TupleTableSlot *slot;
	ItemPointerData start;
	ClaimFound	found;
	BlockNumber nblocks;
	BlockNumber blk;
	int			k = 0;
	int			misses = 0;
	int			marked = 0;
	bool		stop = false;
	int64		prev_account = PG_INT64_MIN;

	/* 1. the live claim of the first key, through the index */
	slot = table_slot_create(heap, NULL);
	found = find_claim(st, heap, index, &st->pending[first[0]], NULL, slot, &start);
	ExecDropSingleTupleTableSlot(slot);
	if (found != CLAIM_LIVE)
		return 0;
	InitDirtySnapshot(dirty);

	/* 2. merge the keys with the heap rows that follow it */
	nblocks = RelationGetNumberOfBlocks(heap);
	for (blk = ItemPointerGetBlockNumber(&start); blk < nblocks && !stop && k < nkeys; blk++)
	{
		Buffer		buf = ReadBufferExtended(heap, MAIN_FORKNUM, blk, RBM_NORMAL, NULL);
		Page		page;
		OffsetNumber off;
		OffsetNumber maxoff;

		LockBuffer(buf, BUFFER_LOCK_SHARE);
		page = BufferGetPage(buf);
		maxoff = PageGetMaxOffsetNumber(page);
		off = (blk == ItemPointerGetBlockNumber(&start))
			? ItemPointerGetOffsetNumber(&start) : FirstOffsetNumber;
		for (; off <= maxoff && !stop && k < nkeys; off++)
		{
			ItemId		lp = PageGetItemId(page, off);
			HeapTupleData tup;
			Datum		a,
						m,
						e;
			bool		n1,
						n2,
						n3;
			int			c;

			if (!ItemIdIsNormal(lp))
				continue;
			tup.t_data = (HeapTupleHeader) PageGetItem(page, lp);
			tup.t_len = ItemIdGetLength(lp);
			tup.t_tableOid = RelationGetRelid(heap);
			ItemPointerSet(&tup.t_self, blk, off);
			if (!HeapTupleSatisfiesVisibility(&tup, &dirty, buf))
				continue;		/* a dead claim */
			if (TransactionIdIsValid(dirty.xmin) || TransactionIdIsValid(dirty.xmax))
			{
				stop = true;	/* being inserted or deleted: leave it to the index */
				break;
			}
			a = heap_getattr(&tup, 1, desc, &n1);
			m = heap_getattr(&tup, 2, desc, &n2);
			e = heap_getattr(&tup, 3, desc, &n3);
			if (n1 || n2 || n3 ||
				VARATT_IS_COMPRESSED(DatumGetPointer(m)) || VARATT_IS_EXTERNAL(DatumGetPointer(m)) ||
				VARATT_IS_COMPRESSED(DatumGetPointer(e)) || VARATT_IS_EXTERNAL(DatumGetPointer(e)) ||
				DatumGetInt64(a) < prev_account)
			{
				stop = true;	/* not a run of claims in key order */
				break;
			}
			prev_account = DatumGetInt64(a);
			for (;;)
			{
				PendingRow *p = &st->pending[first[k]];

				c = claim_row_cmp(DatumGetInt64(a),
								  VARDATA_ANY(DatumGetPointer(m)), VARSIZE_ANY_EXHDR(DatumGetPointer(m)),
								  VARDATA_ANY(DatumGetPointer(e)), VARSIZE_ANY_EXHDR(DatumGetPointer(e)),
								  st, p);
				if (c > 0)
				{
					/* this key is not in the run (it may be elsewhere) */
					if (++k == nkeys || ++misses > HEAP_RUN_MISS_LIMIT)
						break;
					continue;
				}
				if (c == 0)
				{
					exists[k++] = true;
					marked++;
					misses = 0;
				}
				else if (++misses > HEAP_RUN_MISS_LIMIT)
					stop = true;	/* rows not in the batch: the run is over */
				break;
			}
			if (misses > HEAP_RUN_MISS_LIMIT)
				stop = true;
		}
		UnlockReleaseBuffer(buf);
	}
	return marked;
}

/*
 * claim_keys_direct
 *		The fast way to claim keys, inside a subtransaction, in one of two
 *		ways:
 *		- when the last batch was mostly duplicates: probe the primary key
 *		  index for each (sorted) key, then multi-insert the new ones;
 *		- otherwise (new data): multi-insert every key at once, asking the
 *		  unique index only to report possible duplicates, then recheck
 *		  those and delete our rows that turn out to be duplicates.  This
 *		  saves the probe, one descent of the index per key.
 *		Another transaction claiming one of the keys at the same time makes
 *		the unique index (or the recheck) raise unique_violation; then the
 *		subtransaction is rolled back and false returned, and the caller
 *		claims the batch the slow way.
 */
static bool
claim_keys_direct(IngestState *st, const int *first, int nkeys, bool *won)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool ok = true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		Relation	heap = table_open(billing_relid("dedupe_keys"), RowExclusiveLock);
		Relation	index = index_open(billing_relid("dedupe_keys_pkey"), RowExclusiveLock);
		EState	   *estate = CreateExecutorState();
		ResultRelInfo *rri = makeNode(ResultRelInfo);
		TupleTableSlot **slots = palloc(WRITE_BATCH * sizeof(TupleTableSlot *));
		CommandId	cid = GetCurrentCommandId(true);
		int			nslots = 0;
		int			j;
		MemoryContext tmp = AllocSetContextCreate(oldcontext, "billing claim",
												  ALLOCSET_DEFAULT_SIZES);
		bool	   *exists = palloc0(Max(nkeys, 1) * sizeof(bool));
		bool		insert_first = !st->claims_dup_heavy;
		int		   *slotkey = palloc(WRITE_BATCH * sizeof(int));
		int		   *flagged = palloc(Max(nkeys, 1) * sizeof(int));
		ItemPointerData *flagged_tid = palloc(Max(nkeys, 1) * sizeof(ItemPointerData));
		int			nflagged = 0;
		int			ndups = 0;

		InitResultRelInfo(rri, heap, 1, NULL, 0);
		ExecOpenIndices(rri, false);
		for (j = 0; j < WRITE_BATCH; j++)
			slots[j] = table_slot_create(heap, NULL);

		/*
		 * 1. which keys exist already: those in the run of claims that
		 * holds the first key (a replay), then, unless inserting first,
		 * the others through the index
		 */
		if (nkeys > 0 && match_heap_run(st, first, nkeys, exists, heap, index) < nkeys &&
			!insert_first)
		{
			int		   *rest = palloc(nkeys * sizeof(int));
			int		   *restpos = palloc(nkeys * sizeof(int));
			bool	   *restexists = palloc0(nkeys * sizeof(bool));
			int			nrest = 0;

			for (j = 0; j < nkeys; j++)
				if (!exists[j])
				{
					restpos[nrest] = j;
					rest[nrest++] = first[j];
				}
			mark_existing(st, rest, nrest, restexists, heap, index, tmp);
			for (j = 0; j < nrest; j++)
				exists[restpos[j]] = restexists[j];
			pfree(rest);
			pfree(restpos);
			pfree(restexists);
		}

		/* 2. multi-insert the others */
		for (j = 0; j <= nkeys; j++)
		{
			if (j < nkeys && !exists[j])
			{
				PendingRow *p = &st->pending[first[j]];
				MeterSlot  *m = st->slots[p->key.meter];
				MemoryContext old = MemoryContextSwitchTo(tmp);
				TupleTableSlot *ts = slots[nslots++];

				ExecClearTuple(ts);
				ts->tts_values[0] = Int64GetDatum(p->key.account_id);
				ts->tts_values[1] = PointerGetDatum(cstring_to_text(m->name));
				ts->tts_values[2] = PointerGetDatum(cstring_to_text_with_len(p->event_id, p->event_len));
				ts->tts_values[3] = TimestampTzGetDatum(m->expires);
				memset(ts->tts_isnull, 0, 4 * sizeof(bool));
				ExecStoreVirtualTuple(ts);
				MemoryContextSwitchTo(old);
				slotkey[nslots - 1] = j;
				won[j] = true;
			}
			if (nslots > 0 && (nslots == WRITE_BATCH || j == nkeys))
			{
				int			i;

				table_multi_insert(heap, slots, nslots, cid, 0, NULL);
				for (i = 0; i < nslots; i++)
				{
					List	   *conflicts = ExecInsertIndexTuples(rri, slots[i], estate, false,
																  insert_first, NULL, NIL);

					if (conflicts != NIL)
					{
						flagged[nflagged] = slotkey[i];
						flagged_tid[nflagged++] = slots[i]->tts_tid;
						list_free(conflicts);
					}
				}
				nslots = 0;
				MemoryContextReset(tmp);
			}
		}
		CommandCounterIncrement();

		/* 3. keys the index flagged: a duplicate drops our row */
		if (nflagged > 0)
		{
			TupleTableSlot *probe = table_slot_create(heap, NULL);

			for (j = 0; j < nflagged; j++)
			{
				PendingRow *p = &st->pending[first[flagged[j]]];
				MemoryContext old = MemoryContextSwitchTo(tmp);
				ItemPointerData other;
				ClaimFound	found = find_claim(st, heap, index, p, &flagged_tid[j], probe, &other);

				MemoryContextSwitchTo(old);
				MemoryContextReset(tmp);

				/*
				 * Another transaction's claim in progress: the slow path
				 * (INSERT ... ON CONFLICT) waits for it properly.
				 */
				if (found == CLAIM_BUSY)
					ereport(ERROR,
							(errcode(ERRCODE_UNIQUE_VIOLATION),
							 errmsg("event id is being claimed by another transaction")));
				if (found == CLAIM_LIVE)
				{
					simple_heap_delete(heap, &flagged_tid[j]);
					won[flagged[j]] = false;
				}
			}
			ExecDropSingleTupleTableSlot(probe);
			CommandCounterIncrement();
		}

		/* which way the next batch goes */
		for (j = 0; j < nkeys; j++)
			ndups += !won[j];
		st->claims_dup_heavy = (ndups > nkeys / 4);

		pfree(exists);
		pfree(slotkey);
		pfree(flagged);
		pfree(flagged_tid);
		for (j = 0; j < WRITE_BATCH; j++)
			ExecDropSingleTupleTableSlot(slots[j]);
		ExecCloseIndices(rri);
		FreeExecutorState(estate);
		index_close(index, NoLock);
		table_close(heap, NoLock);
		MemoryContextDelete(tmp);
		pfree(slots);

		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		if (edata->sqlerrcode != ERRCODE_UNIQUE_VIOLATION)
			ReThrowError(edata);
		FreeErrorData(edata);
		memset(won, 0, nkeys * sizeof(bool));
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/*
 * claim_pending
 *		Claim every queued event id with one INSERT ... ON CONFLICT DO
 *		NOTHING RETURNING, in key order (so that concurrent batches cannot
 *		deadlock), and count the reports whose ids this transaction claimed.
 *		Repeats within the batch are sorted next to each other; the first
 *		to arrive is the one claimed.
 */
static void
claim_pending(IngestState *st)
{
	Size		budget = (Size) work_mem * 1024;
	int			n = st->npending;
	int			nkeys = 0;
	int		   *first;			/* per key: index of its first report */
	bool	   *won;			/* per key: claimed by this transaction */
	int			j,
				k;

	if (n == 0)
		return;
	sort_state = st;
	qsort(st->pending, n, sizeof(PendingRow), pending_cmp);

	first = palloc(n * sizeof(int));
	for (j = 0; j < n; j++)
		if (j == 0 || !pending_same_key(&st->pending[j], &st->pending[j - 1]))
			first[nkeys++] = j;

	won = palloc0(nkeys * sizeof(bool));
	/* on Citus dedupe_keys is a shell here: claim through Citus */
	if (billing_distributed() || !claim_keys_direct(st, first, nkeys, won))
		claim_keys_spi(st, first, nkeys, won);

	/*
	 * Count the winners.  The queue takes most of the budget, so the cell
	 * table is written out whenever it would outgrow the rest; the queue
	 * is in account order, so each write covers its own accounts.
	 */
	for (j = 0, k = -1; j < n; j++)
	{
		PendingRow *p = &st->pending[j];

		if (k + 1 < nkeys && first[k + 1] == j)
		{
			k++;
			if (won[k])
			{
				if (cells_at_limit(st, budget))
					write_cells(st, false);
				accumulate(st, &p->key, &p->value, p->ts, p->ord);
			}
			else
				st->duplicates++;
		}
		else
			st->duplicates++;	/* a repeat within the batch */
		if (!p->value.isdec && p->value.num)
			pfree(p->value.num);
		pfree(p->event_id);
	}
	pfree(won);
	pfree(first);
	st->npending = 0;
	st->pending_bytes = 0;
}

/*
 * DeltaWriter: multi-inserts rows into billing.usage_deltas and their
 * index entries, the way COPY does.
 */
typedef struct DeltaWriter
{
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slots[WRITE_BATCH];
	int			n;
	Oid			seqid;
	CommandId	cid;
	MemoryContext cxt;			/* holds the writer's own state */
} DeltaWriter;

static void
writer_open(DeltaWriter *w)
{
	int			i;

	w->rel = table_open(billing_relid("usage_deltas"), RowExclusiveLock);
	w->estate = CreateExecutorState();
	w->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(w->rri, w->rel, 1, NULL, 0);
	ExecOpenIndices(w->rri, false);
	for (i = 0; i < WRITE_BATCH; i++)
		w->slots[i] = NULL;
	w->n = 0;
	w->seqid = InvalidOid;
	w->cid = GetCurrentCommandId(true);
	w->cxt = CurrentMemoryContext;
}

static void
writer_flush(DeltaWriter *w)
{
	int			i;

	if (w->n == 0)
		return;
	table_multi_insert(w->rel, w->slots, w->n, w->cid, 0, NULL);
	for (i = 0; i < w->n; i++)
	{
		List	   *r = ExecInsertIndexTuples(w->rri, w->slots[i], w->estate,
											  false, false, NULL, NIL);

		list_free(r);
		ExecClearTuple(w->slots[i]);
	}
	ResetPerTupleExprContext(w->estate);
	w->n = 0;
}

/*
 * writer_add
 *		Queue one delta row: an account's packed cells.  The value must stay
 *		valid until the next writer_flush.
 */
static void
writer_add(DeltaWriter *w, int64 account_id, bool has_seq, int64 seq, Datum cells)
{
	TupleTableSlot *slot;

	if (w->slots[w->n] == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(w->cxt);

		w->slots[w->n] = MakeSingleTupleTableSlot(RelationGetDescr(w->rel),
												  table_slot_callbacks(w->rel));
		MemoryContextSwitchTo(old);
	}
	slot = w->slots[w->n];
	ExecClearTuple(slot);
	/* account_id, seq, cells */
	slot->tts_values[0] = Int64GetDatum(account_id);
	slot->tts_isnull[0] = false;
	slot->tts_values[1] = Int64GetDatum(seq);
	slot->tts_isnull[1] = !has_seq;
	slot->tts_values[2] = cells;
	slot->tts_isnull[2] = false;
	ExecStoreVirtualTuple(slot);
	if (++w->n == WRITE_BATCH)
		writer_flush(w);
}

static void
writer_close(DeltaWriter *w)
{
	int			i;

	writer_flush(w);
	for (i = 0; i < WRITE_BATCH; i++)
		if (w->slots[i])
			ExecDropSingleTupleTableSlot(w->slots[i]);
	ExecCloseIndices(w->rri);
	FreeExecutorState(w->estate);
	table_close(w->rel, NoLock);
}

/* a counter cell with its key inline, for sorting without pointer chasing */
typedef struct CellRef
{
	BucketKey	key;
	BucketAcc  *acc;
} CellRef;

static inline int
cell_cmp(const CellRef *a, const CellRef *b)
{
	const BucketKey *x = &a->key;
	const BucketKey *y = &b->key;

	if (x->account_id != y->account_id)
		return x->account_id < y->account_id ? -1 : 1;
	if (x->meter != y->meter)
		return x->meter < y->meter ? -1 : 1;
	if (x->dim != y->dim)
		return x->dim < y->dim ? -1 : 1;
	if (x->bucket_start != y->bucket_start)
		return x->bucket_start < y->bucket_start ? -1 : 1;
	return 0;
}

/* sort_cells(CellRef *, size_t): qsort with cell_cmp inlined */
#define ST_SORT			sort_cells
#define ST_ELEMENT_TYPE	CellRef
#define ST_COMPARE(a, b)	cell_cmp(a, b)
#define ST_SCOPE		static
#define ST_DECLARE
#define ST_DEFINE
#include "lib/sort_template.h"

/*
 * flush_bufs
 *		The accumulator's flush buffers, able to hold ncells cells.
 */
static FlushBufs *
flush_bufs(IngestState *st, long ncells)
{
	FlushBufs  *fb = &st->fb;

	if (fb->cap < ncells)
	{
		MemoryContext old = MemoryContextSwitchTo(st->ctx);
		long		cap = Max(ncells, Max(fb->cap * 2, 16));

		if (fb->cap > 0)
		{
			pfree(fb->cells);
			pfree(fb->accounts);
			pfree(fb->row_accounts);
			pfree(fb->row_seqs);
			pfree(fb->row_noseq);
			pfree(fb->row_cells);
			pfree(fb->row_offsets);
		}
		else
			initStringInfo(&fb->pack);
		fb->cells = palloc(cap * sizeof(CellRef));
		fb->accounts = palloc(cap * sizeof(int64));
		fb->row_accounts = palloc(cap * sizeof(int64));
		fb->row_seqs = palloc(cap * sizeof(Datum));
		fb->row_noseq = palloc(cap * sizeof(bool));
		fb->row_cells = palloc(cap * sizeof(Datum));
		fb->row_offsets = palloc(cap * sizeof(int));
		fb->cap = cap;
		MemoryContextSwitchTo(old);
	}
	return fb;
}

/*
 * pack_deltas
 *		Pack the sorted counter cells into delta rows: one row per account,
 *		or several when its cells would not fit in CELLS_ROW_BYTES.  A row
 *		with cells of a last meter takes a number of billing.usage_seq, its
 *		arrival order.
 */
static void
pack_deltas(IngestState *st, FlushBufs *fb, long ncells)
{
	CellRef    *cells = fb->cells;
	Oid			seqid = InvalidOid;
	long		i = 0;

	fb->nrows = 0;
	resetStringInfo(&fb->pack);
	while (i < ncells)
	{
		int64		account = cells[i].key.account_id;
		int32		meter = -1;
		int32		dim = -1;
		bool		has_last = false;
		CellWriter	cw;
		long		r = fb->nrows++;

		cells_begin(&cw, &fb->pack);
		for (; i < ncells && cells[i].key.account_id == account; i++)
		{
			BucketKey  *k = &cells[i].key;
			BucketAcc  *acc = cells[i].acc;

			/* the cells are spread over the hash table: fetch ahead */
			if (i + 8 < ncells)
				prefetch(cells[i + 8].acc);
			if (cells_size(&cw) >= CELLS_ROW_BYTES)
				break;			/* the rest in another row */
			if (k->meter != meter || k->dim != dim)
			{
				MeterSlot  *slot = st->slots[k->meter];
				DimEntry   *d = st->dims[k->dim];
				bool		is_last = (slot->def.agg == AGG_LAST);

				cells_series(&cw, slot->name, slot->namelen, d->str, d->len, is_last);
				has_last |= is_last;
				meter = k->meter;
				dim = k->dim;
			}
			cells_add(&cw, k->bucket_start, acc->events, acc->value.isdec,
					  acc->value.dec, acc->value.num, acc->last_ts);
		}
		fb->row_accounts[r] = account;
		fb->row_noseq[r] = !has_last;
		if (has_last)
		{
			if (!OidIsValid(seqid))
				seqid = billing_relid("usage_seq");
			fb->row_seqs[r] = Int64GetDatum(nextval_internal(seqid, false));
		}
		else
			fb->row_seqs[r] = (Datum) 0;
		fb->row_offsets[r] = cells_end(&cw);
	}
	/* the buffer is complete: point at the values */
	for (long r = 0; r < fb->nrows; r++)
		fb->row_cells[r] = PointerGetDatum(fb->pack.data + fb->row_offsets[r]);
}

/*
 * write_deltas_heap
 *		Write the delta rows with multi-inserts straight into the heap and
 *		index of billing.usage_deltas (single node).
 */
static void
write_deltas_heap(FlushBufs *rows)
{
	DeltaWriter w;

	writer_open(&w);
	for (long i = 0; i < rows->nrows; i++)
		writer_add(&w, rows->row_accounts[i], !rows->row_noseq[i],
				   DatumGetInt64(rows->row_seqs[i]), rows->row_cells[i]);
	writer_close(&w);
}

/*
 * write_deltas_citus
 *		write_deltas_heap on Citus: the same delta rows, written by SQL that
 *		Citus routes to the shards.  One row goes in a router INSERT; more
 *		go in one INSERT ... SELECT over parallel arrays, which Citus splits
 *		by shard and copies to each shard in one go.
 */
static void
write_deltas_citus(FlushBufs *rows)
{
	Datum		values[3];
	char		nulls[3] = {' ', ' ', ' '};
	int			ret;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (rows->nrows == 1)
	{
		/* a router INSERT of one row (record, report_cumulative, ...) */
		Oid			types[3] = {INT8OID, INT8OID, BYTEAOID};

		if (citus_delta_plan == NULL)
			citus_delta_plan = spi_prepare_kept(
												"INSERT INTO billing.usage_deltas (account_id, seq, cells) "
												"VALUES ($1, $2, $3)",
												3, types);
		values[0] = Int64GetDatum(rows->row_accounts[0]);
		values[1] = rows->row_seqs[0];
		nulls[1] = rows->row_noseq[0] ? 'n' : ' ';
		values[2] = rows->row_cells[0];
		ret = SPI_execute_plan(citus_delta_plan, values, nulls, false, 0);
	}
	else
	{
		Oid			types[3] = {INT8ARRAYOID, INT8ARRAYOID, BYTEAARRAYOID};
		Datum	   *accts = palloc(rows->nrows * sizeof(Datum));
		int			dimsize[1] = {(int) rows->nrows};
		int			lbound[1] = {1};

		for (long i = 0; i < rows->nrows; i++)
			accts[i] = Int64GetDatum(rows->row_accounts[i]);
		values[0] = PointerGetDatum(construct_array(accts, rows->nrows, INT8OID, 8, true, TYPALIGN_DOUBLE));
		values[1] = PointerGetDatum(construct_md_array(rows->row_seqs, rows->row_noseq, 1, dimsize, lbound,
													   INT8OID, 8, true, TYPALIGN_DOUBLE));
		values[2] = PointerGetDatum(construct_array(rows->row_cells, rows->nrows, BYTEAOID, -1, false, TYPALIGN_INT));
		/* planned with the values: Citus splits the rows by shard */
		ret = SPI_execute_with_args("INSERT INTO billing.usage_deltas (account_id, seq, cells) "
									"SELECT * FROM ROWS FROM (pg_catalog.unnest($1), "
									"pg_catalog.unnest($2), pg_catalog.unnest($3))",
									3, types, values, nulls, false, 0);
	}
	if (ret != SPI_OK_INSERT || (long) SPI_processed != rows->nrows)
		elog(ERROR, "could not write usage deltas: %s", SPI_result_code_string(ret));
	SPI_finish();
}

/*
 * Delta rows on tape: each is the account, whether it has a seq (a last
 * meter), the seq, the length of the packed cells and the cells (without
 * the varlena header).
 */
typedef struct RunRow
{
	int64		account;
	int64		seq;
	bool		has_seq;
	uint32		len;
	char	   *data;			/* the packed cells, in the run's buffer */
	Size		cap;			/* size of that buffer */
	bool		valid;			/* false at the end of the run */
} RunRow;

/*
 * spill_run
 *		Put the packed delta rows of one flush on tape as a run.
 */
static void
spill_run(IngestState *st, FlushBufs *fb)
{
	LogicalTape *lt;
	/* the tape set and its buffers live as long as the accumulator */
	MemoryContext old = MemoryContextSwitchTo(st->ctx);

	if (st->spill == NULL)
		st->spill = LogicalTapeSetCreate(false, NULL, -1);
	lt = LogicalTapeCreate(st->spill);
	for (long r = 0; r < fb->nrows; r++)
	{
		bytea	   *v = (bytea *) DatumGetPointer(fb->row_cells[r]);
		uint32		len = VARSIZE(v) - VARHDRSZ;
		int64		seq = fb->row_noseq[r] ? 0 : DatumGetInt64(fb->row_seqs[r]);
		char		has_seq = !fb->row_noseq[r];

		LogicalTapeWrite(lt, &fb->row_accounts[r], sizeof(int64));
		LogicalTapeWrite(lt, &seq, sizeof(int64));
		LogicalTapeWrite(lt, &has_seq, 1);
		LogicalTapeWrite(lt, &len, sizeof(uint32));
		LogicalTapeWrite(lt, VARDATA(v), len);
	}
	st->runs[st->nruns++] = lt;
	MemoryContextSwitchTo(old);
}

/* the next row of a run, or valid = false at its end */
static void
read_run_row(LogicalTape *lt, RunRow *row, MemoryContext cxt)
{
	char		has_seq;

	if (LogicalTapeRead(lt, &row->account, sizeof(int64)) != sizeof(int64))
	{
		row->valid = false;
		return;
	}
	if (LogicalTapeRead(lt, &row->seq, sizeof(int64)) != sizeof(int64) ||
		LogicalTapeRead(lt, &has_seq, 1) != 1 ||
		LogicalTapeRead(lt, &row->len, sizeof(uint32)) != sizeof(uint32))
		elog(ERROR, "could not read usage deltas back from tape");
	row->has_seq = has_seq != 0;
	if (row->len > row->cap)
	{
		row->cap = Max(row->len, 2 * row->cap);
		row->data = row->data ? repalloc(row->data, row->cap)
			: MemoryContextAlloc(cxt, row->cap);
	}
	if (LogicalTapeRead(lt, row->data, row->len) != row->len)
		elog(ERROR, "could not read usage deltas back from tape");
	row->valid = true;
}

/*
 * merge_emit
 *		Queue one merged delta row: a copy of the packed cells data[0..len)
 *		(version byte and series) in rowcxt, which is emptied once the
 *		writer has written its batch.
 */
static void
merge_emit(DeltaWriter *w, MemoryContext rowcxt, int64 account, bool has_seq,
		   int64 seq, const char *data, uint32 len)
{
	bytea	   *v = MemoryContextAlloc(rowcxt, VARHDRSZ + len);

	SET_VARSIZE(v, VARHDRSZ + len);
	memcpy(VARDATA(v), data, len);
	writer_add(w, account, has_seq, seq, PointerGetDatum(v));
	if (w->n == 0)
		MemoryContextReset(rowcxt);
}

/*
 * merge_runs
 *		Write the runs on tape as delta rows: for each account, in order,
 *		its rows of every run joined into as few rows as CELLS_ROW_BYTES
 *		allows (a packed value is a list of series, so joining is
 *		appending).  A row with a seq (a last meter) keeps its own row and
 *		seq: the seq orders values that arrived at the same timestamp.
 */
static void
merge_runs(IngestState *st)
{
	MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext, "billing merge",
											  ALLOCSET_DEFAULT_SIZES);
	MemoryContext rowcxt = AllocSetContextCreate(cxt, "billing merged rows",
												 ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	RunRow	   *cur = palloc0(st->nruns * sizeof(RunRow));
	StringInfoData buf;
	DeltaWriter w;
	int			r;

	for (r = 0; r < st->nruns; r++)
	{
		LogicalTapeRewindForRead(st->runs[r], BLCKSZ);
		read_run_row(st->runs[r], &cur[r], cxt);
	}
	writer_open(&w);
	initStringInfo(&buf);
	for (;;)
	{
		int64		account = PG_INT64_MAX;
		bool		any = false;

		for (r = 0; r < st->nruns; r++)
			if (cur[r].valid && (!any || cur[r].account < account))
			{
				account = cur[r].account;
				any = true;
			}
		if (!any)
			break;

		/* the rows of this account, run by run */
		resetStringInfo(&buf);
		for (r = 0; r < st->nruns; r++)
		{
			while (cur[r].valid && cur[r].account == account)
			{
				RunRow	   *row = &cur[r];

				if (row->has_seq)	/* a row of its own */
					merge_emit(&w, rowcxt, account, true, row->seq, row->data, row->len);
				else
				{
					/* append its series (all but the version byte) */
					if (buf.len > 0 && buf.len + row->len - 1 > CELLS_ROW_BYTES)
					{
						merge_emit(&w, rowcxt, account, false, 0, buf.data, buf.len);
						resetStringInfo(&buf);
					}
					if (buf.len == 0)
						appendBinaryStringInfo(&buf, row->data, 1);
					appendBinaryStringInfo(&buf, row->data + 1, row->len - 1);
				}
				read_run_row(st->runs[r], row, cxt);
			}
		}
		if (buf.len > 0)
			merge_emit(&w, rowcxt, account, false, 0, buf.data, buf.len);
	}
	writer_close(&w);
	/* the read buffers are in cxt */
	for (r = 0; r < st->nruns; r++)
		LogicalTapeClose(st->runs[r]);
	LogicalTapeSetClose(st->spill);
	st->spill = NULL;
	st->nruns = 0;
	MemoryContextSwitchTo(old);
	MemoryContextDelete(cxt);
}

/*
 * The accounts one statement's flushes have checked already: a COPY of a
 * million rows flushes dozens of times over the same accounts, and each
 * flush would look every one of them up again.  Forgotten when the
 * statement ends (billing_meter_flush), so a later statement checks again;
 * at most KNOWN_ACCOUNTS_MAX entries (about 2 MB), then no more are added.
 */
#define KNOWN_ACCOUNTS_MAX 65536

/* the distinct accounts of the sorted cells not checked yet, into out */
static long
unknown_accounts(IngestState *st, const CellRef *cells, long ncells, int64 *out)
{
	long		n = 0;

	for (long i = 0; i < ncells; i++)
	{
		int64		a = cells[i].key.account_id;
		bool		found = false;

		if (i > 0 && a == cells[i - 1].key.account_id)
			continue;
		if (st->known_accounts)
			hash_search(st->known_accounts, &a, HASH_FIND, &found);
		if (!found)
			out[n++] = a;
	}
	return n;
}

/* remember accounts that exist (just checked) */
static void
remember_accounts(IngestState *st, const int64 *accounts, long n)
{
	if (st->known_accounts == NULL)
	{
		HASHCTL		ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(int64);
		ctl.entrysize = sizeof(int64);
		ctl.hcxt = st->ctx;
		st->known_accounts = hash_create("billing known accounts", 1024, &ctl,
										 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	for (long i = 0; i < n && hash_get_num_entries(st->known_accounts) < KNOWN_ACCOUNTS_MAX; i++)
		hash_search(st->known_accounts, &accounts[i], HASH_ENTER, NULL);
}

/* the statement ended: its account checks no longer hold */
static void
forget_accounts(IngestState *st)
{
	if (st->known_accounts)
	{
		hash_destroy(st->known_accounts);
		st->known_accounts = NULL;
	}
}

/*
 * flush_state
 *		Check accounts, claim queued event ids, write every counter cell as
 *		a delta row, and empty the accumulator.
 */
static void
flush_state(IngestState *st)
{
	claim_pending(st);
	write_cells(st, true);
}

/*
 * flush_some
 *		Make room in the accumulator in the middle of a statement: claim
 *		the queued ids and put the cells aside (see write_cells).
 */
static void
flush_some(IngestState *st)
{
	claim_pending(st);
	write_cells(st, false);
}

/*
 * write_cells
 *		Check the accounts of the counter cells, write the cells as delta
 *		rows, and empty the cell table.
 */
static void
write_cells(IngestState *st, bool final)
{
	long		naccounts;
	cells_iterator it;
	BucketAcc  *acc;
	FlushBufs  *fb;
	long		ncells;
	long		i = 0;
	MemoryContext tmp;
	MemoryContext old;

	if (st->buckets->members == 0)
	{
		if (final && st->nruns > 0)
		{
			merge_runs(st);
			CommandCounterIncrement();
		}
		return;
	}

	/* group the cells by (account, meter, dimension), buckets in order */
	ncells = st->buckets->members;
	fb = flush_bufs(st, ncells);
	cells_start_iterate(st->buckets, &it);
	while ((acc = cells_iterate(st->buckets, &it)) != NULL)
	{
		fb->cells[i].key = acc->key;
		fb->cells[i++].acc = acc;
	}
	sort_cells(fb->cells, ncells);

	/* every account counted must exist */
	naccounts = unknown_accounts(st, fb->cells, ncells, fb->accounts);
	check_accounts(fb->accounts, naccounts);
	remember_accounts(st, fb->accounts, naccounts);

	tmp = AllocSetContextCreate(CurrentMemoryContext, "billing flush",
								ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(tmp);
	pack_deltas(st, fb, ncells);
	if (billing_distributed())
		write_deltas_citus(fb);
	else if (final && st->nruns == 0)
		write_deltas_heap(fb);
	else
	{
		/*
		 * In the middle of a statement (or at its end, after such flushes)
		 * the rows go on tape, sorted by account, and the statement's end
		 * merges the runs into one row per account: a COPY flushing dozens
		 * of times would otherwise write a row per account each time, and
		 * the rows, not their bytes, cost most.
		 */
		if (st->nruns == MAX_RUNS)
			merge_runs(st);
		spill_run(st, fb);
		if (final)
			merge_runs(st);
	}
	MemoryContextSwitchTo(old);
	MemoryContextDelete(tmp);
	if (st->numeric_cells)
		for (i = 0; i < ncells; i++)
			if (!fb->cells[i].acc->value.isdec)
				pfree(fb->cells[i].acc->value.num);
	st->numeric_cells = false;

	/* empty the counters; the table keeps its (bounded) capacity */
	cells_reset(st->buckets);
	CommandCounterIncrement();
}

/* ---------------------------------------------------------------------
 * Transaction hooks for the trigger accumulators
 * ---------------------------------------------------------------------
 */

static bool
state_is_empty(IngestState *st)
{
	return st->buckets->members == 0 && st->npending == 0 && st->nruns == 0;
}

static void
ingest_xact_cb(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PARALLEL_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			{
				IngestState *st;

				for (st = trigger_states; st; st = st->next)
					if (!state_is_empty(st))
						ereport(ERROR,
								(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
								 errmsg("usage counted by a metered table was not flushed"),
								 errdetail("The statement-level trigger billing_meter_flush did not run."),
								 errhint("Do not disable the triggers that billing.meter_table creates.")));
			}
			break;
		default:
			/* commit or abort: the memory goes with TopTransactionContext */
			trigger_states = NULL;
			break;
	}
}

static void
ingest_subxact_cb(SubXactEvent event, SubTransactionId mySubid,
				  SubTransactionId parentSubid, void *arg)
{
	IngestState *st;

	switch (event)
	{
		case SUBXACT_EVENT_ABORT_SUB:
			/* drop the reports the aborted subtransaction made */
			while (trigger_states && trigger_states->subid == mySubid)
			{
				st = trigger_states;
				trigger_states = st->next;
				MemoryContextDelete(st->ctx);
			}
			break;
		case SUBXACT_EVENT_COMMIT_SUB:
			for (st = trigger_states; st && st->subid == mySubid; st = st->next)
				st->subid = parentSubid;
			break;
		default:
			break;
	}
}

/*
 * billing_ingest_init
 *		Register the cache and transaction callbacks (from _PG_init).
 */
void
billing_ingest_init(void)
{
	CacheRegisterRelcacheCallback(meters_relcache_cb, (Datum) 0);
	RegisterXactCallback(ingest_xact_cb, NULL);
	RegisterSubXactCallback(ingest_subxact_cb, NULL);
}

/*
 * current_trigger_state
 *		The accumulator of the current subtransaction, created on demand.
 */
static IngestState *
current_trigger_state(void)
{
	SubTransactionId subid = GetCurrentSubTransactionId();
	IngestState *st;

	if (trigger_states && trigger_states->subid == subid)
		return trigger_states;
	st = state_create(TopTransactionContext, 1024);
	st->subid = subid;
	st->next = trigger_states;
	trigger_states = st;
	return st;
}

/* ---------------------------------------------------------------------
 * SQL-callable functions
 * ---------------------------------------------------------------------
 */

static void
require_arg(FunctionCallInfo fcinfo, int n, const char *name)
{
	if (PG_ARGISNULL(n))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

/*
 * billing.record(account_id, meter, quantity, ts, event_id, dimension)
 *		Count one usage report; false when event_id was already counted.
 */
Datum
billing_record(PG_FUNCTION_ARGS)
{
	IngestState *st;
	text	   *meter;
	text	   *event_id = NULL;
	text	   *dim = NULL;
	ReportResult r;
	MemoryContext callctx = CurrentMemoryContext;

	require_arg(fcinfo, 0, "account_id");
	require_arg(fcinfo, 1, "meter");
	require_arg(fcinfo, 2, "quantity");
	require_arg(fcinfo, 3, "ts");
	meter = PG_GETARG_TEXT_PP(1);
	if (!PG_ARGISNULL(4))
		event_id = PG_GETARG_TEXT_PP(4);
	if (!PG_ARGISNULL(5))
		dim = PG_GETARG_TEXT_PP(5);

	st = state_create(callctx, 8);
	r = add_report(st, PG_GETARG_INT64(0),
				   VARDATA_ANY(meter), VARSIZE_ANY_EXHDR(meter),
				   PG_GETARG_DATUM(2), NUMERICOID, PG_GETARG_TIMESTAMPTZ(3),
				   event_id ? VARDATA_ANY(event_id) : NULL,
				   event_id ? VARSIZE_ANY_EXHDR(event_id) : 0,
				   dim ? VARDATA_ANY(dim) : "", dim ? VARSIZE_ANY_EXHDR(dim) : 0,
				   MODE_CLAIM_NOW);
	flush_state(st);
	MemoryContextDelete(st->ctx);
	PG_RETURN_BOOL(r == REPORT_COUNTED);
}

/*
 * table_conf
 *		Column numbers of a metered table's trigger, resolved once per
 *		accumulator.  Trigger arguments: account, meter, quantity, ts,
 *		event id ('' if none), dimension ('' if none), keep_rows ('t'/'f').
 */
static TableConf *
table_conf(IngestState *st, TriggerData *td)
{
	Trigger    *tg = td->tg_trigger;
	TupleDesc	desc = RelationGetDescr(td->tg_relation);
	TableConf  *c;
	int			i;
	AttrNumber *atts[6];
	MemoryContext old;

	for (i = 0; i < st->ntables; i++)
		if (st->tables[i].tgoid == tg->tgoid)
			return &st->tables[i];

	if (tg->tgnargs != 7)
		elog(ERROR, "billing_meter_row: expected 7 trigger arguments, got %d", tg->tgnargs);

	old = MemoryContextSwitchTo(st->ctx);
	st->tables = st->tables ? repalloc(st->tables, (st->ntables + 1) * sizeof(TableConf))
		: palloc(sizeof(TableConf));
	MemoryContextSwitchTo(old);
	c = &st->tables[st->ntables];
	memset(c, 0, sizeof(*c));
	c->tgoid = tg->tgoid;
	atts[0] = &c->account_att;
	atts[1] = &c->meter_att;
	atts[2] = &c->qty_att;
	atts[3] = &c->ts_att;
	atts[4] = &c->event_att;
	atts[5] = &c->dim_att;
	for (i = 0; i < 6; i++)
	{
		const char *col = tg->tgargs[i];

		*atts[i] = 0;
		if (col[0] == '\0')
			continue;
		for (int a = 0; a < desc->natts; a++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, a);

			if (!att->attisdropped && strcmp(NameStr(att->attname), col) == 0)
			{
				*atts[i] = att->attnum;
				if (i == 2)
					c->qty_type = att->atttypid;
				break;
			}
		}
		if (*atts[i] == 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" of metered table \"%s\" does not exist",
							col, RelationGetRelationName(td->tg_relation)),
					 errhint("Run billing.meter_table again after renaming or dropping columns.")));
	}
	c->keep_rows = (tg->tgargs[6][0] == 't');
	st->ntables++;
	return c;
}

/* text bytes of a text-like column (text, varchar) */
static void
text_arg(Datum d, const char **s, int *len)
{
	text	   *t = DatumGetTextPP(d);

	*s = VARDATA_ANY(t);
	*len = VARSIZE_ANY_EXHDR(t);
}

/*
 * meter_slot
 *		Read a metered row's columns from slot and pass it to add_report in
 *		mode.
 */
static ReportResult
meter_slot(IngestState *st, TableConf *c, TupleTableSlot *slot, Relation rel, ReportMode mode)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Datum		account,
				meter,
				qty,
				ts;
	bool		n1,
				n2,
				n3,
				n4;
	const char *mstr,
			   *estr = NULL,
			   *dstr = "";
	int			mlen,
				elen = 0,
				dlen = 0;
	int64		account_id;

	account = slot_getattr(slot, c->account_att, &n1);
	meter = slot_getattr(slot, c->meter_att, &n2);
	qty = slot_getattr(slot, c->qty_att, &n3);
	ts = slot_getattr(slot, c->ts_att, &n4);
	if (n1 || n2 || n3 || n4)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s of a metered row must not be null",
						n1 ? "account" : n2 ? "meter" : n3 ? "quantity" : "timestamp"),
				 errdetail("Table \"%s\".", RelationGetRelationName(rel))));

	switch (TupleDescAttr(desc, c->account_att - 1)->atttypid)
	{
		case INT2OID:
			account_id = DatumGetInt16(account);
			break;
		case INT4OID:
			account_id = DatumGetInt32(account);
			break;
		default:
			account_id = DatumGetInt64(account);
			break;
	}
	text_arg(meter, &mstr, &mlen);
	if (c->event_att)
	{
		bool		isnull;
		Datum		e = slot_getattr(slot, c->event_att, &isnull);

		if (!isnull)
			text_arg(e, &estr, &elen);
	}
	if (c->dim_att)
	{
		bool		isnull;
		Datum		d = slot_getattr(slot, c->dim_att, &isnull);

		if (!isnull)
			text_arg(d, &dstr, &dlen);
	}

	return add_report(st, account_id, mstr, mlen, qty, c->qty_type,
					  DatumGetTimestampTz(ts), estr, elen, dstr, dlen, mode);
}

/* meter_slot for the row a row trigger fired for */
static ReportResult
meter_tuple(IngestState *st, TableConf *c, TriggerData *td, ReportMode mode)
{
	return meter_slot(st, c, td->tg_trigslot, td->tg_relation, mode);
}

/*
 * billing_meter_row
 *		BEFORE INSERT FOR EACH ROW trigger of a metered table.  With
 *		keep_rows false it counts the row and drops it (returns NULL).  With
 *		keep_rows true it only claims the row's event id: a duplicate is
 *		dropped, any other row is stored and counted by the AFTER STATEMENT
 *		trigger over the inserted rows, so that a row skipped later
 *		(INSERT ... ON CONFLICT DO NOTHING, another BEFORE trigger) is not
 *		counted.
 */
Datum
billing_meter_row(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	IngestState *st;
	TableConf  *c;
	ReportResult r;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "billing_meter_row: not called by trigger manager");
	if (!TRIGGER_FIRED_BEFORE(td->tg_event) || !TRIGGER_FIRED_FOR_ROW(td->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(td->tg_event))
		elog(ERROR, "billing_meter_row: must be fired BEFORE INSERT FOR EACH ROW");

	st = current_trigger_state();
	c = table_conf(st, td);
	r = meter_tuple(st, c, td, c->keep_rows ? MODE_CLAIM_ONLY : MODE_QUEUE);
	maybe_flush(st);

	if (c->keep_rows && r == REPORT_COUNTED)
		return PointerGetDatum(td->tg_trigtuple);
	return PointerGetDatum(NULL);
}

/*
 * billing_meter_after_rows
 *		AFTER INSERT FOR EACH STATEMENT trigger of a metered table with
 *		keep_rows, with the statement's inserted rows as its transition
 *		table: counts each row actually stored (its event id was claimed by
 *		the BEFORE ROW trigger).  It fires before billing_meter_flush (AFTER
 *		STATEMENT triggers fire in name order), which writes the counts.
 *		The transition table spills to disk beyond work_mem, so a large COPY
 *		queues nothing per row in memory.
 */
Datum
billing_meter_after_rows(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	IngestState *st;
	TableConf  *c;
	TupleTableSlot *slot;
	MemoryContext rowcxt;
	int			ptr;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "billing_meter_after_rows: not called by trigger manager");
	if (!TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_STATEMENT(td->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(td->tg_event) || td->tg_newtable == NULL)
		elog(ERROR, "billing_meter_after_rows: must be fired AFTER INSERT FOR EACH STATEMENT with a NEW TABLE");

	st = current_trigger_state();
	c = table_conf(st, td);
	slot = MakeSingleTupleTableSlot(RelationGetDescr(td->tg_relation), &TTSOpsMinimalTuple);
	/* a read pointer of our own, from the start */
	ptr = tuplestore_alloc_read_pointer(td->tg_newtable, EXEC_FLAG_REWIND);
	tuplestore_select_read_pointer(td->tg_newtable, ptr);
	tuplestore_rescan(td->tg_newtable);
	/* what reading one row allocates (detoasted values) is freed with it */
	rowcxt = AllocSetContextCreate(CurrentMemoryContext, "billing metered row",
								   ALLOCSET_DEFAULT_SIZES);
	while (tuplestore_gettupleslot(td->tg_newtable, true, false, slot))
	{
		MemoryContext old = MemoryContextSwitchTo(rowcxt);

		(void) meter_slot(st, c, slot, td->tg_relation, MODE_COUNT_ONLY);
		maybe_flush(st);
		MemoryContextSwitchTo(old);
		MemoryContextReset(rowcxt);
	}
	MemoryContextDelete(rowcxt);
	tuplestore_select_read_pointer(td->tg_newtable, 0);
	ExecDropSingleTupleTableSlot(slot);
	return PointerGetDatum(NULL);
}

/*
 * billing_meter_flush
 *		AFTER INSERT FOR EACH STATEMENT trigger of a metered table: writes
 *		what the statement counted.
 */
Datum
billing_meter_flush(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	SubTransactionId subid = GetCurrentSubTransactionId();
	IngestState *st;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "billing_meter_flush: not called by trigger manager");
	if (!TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_STATEMENT(td->tg_event))
		elog(ERROR, "billing_meter_flush: must be fired AFTER ... FOR EACH STATEMENT");

	for (st = trigger_states; st && st->subid == subid; st = st->next)
	{
		flush_state(st);
		forget_accounts(st);
	}
	return PointerGetDatum(NULL);
}

/*
 * array_elems
 *		Deconstruct a one-dimensional array argument; raises 22004 on NULL
 *		elements (when nulls_ok is false) and, when expect >= 0, 22023 on a
 *		length other than expect (the arrays of an ingest batch).
 */
int
array_elems(ArrayType *a, Oid type, int len, bool byval, char align,
			Datum **elems, bool **nulls, int expect, const char *name,
			bool nulls_ok)
{
	int			n;

	if (ARR_NDIM(a) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a one-dimensional array", name)));
	deconstruct_array(a, type, len, byval, align, elems, nulls, &n);
	if (expect >= 0 && n != expect)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the arrays of a batch must have the same length"),
				 errdetail("account_ids has %d elements, %s has %d.", expect, name, n)));
	if (!nulls_ok)
		for (int i = 0; i < n; i++)
			if ((*nulls)[i])
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("element %d of %s must not be null", i + 1, name)));
	return n;
}

/*
 * claim_offset
 *		Advance the stored offset of (source, partition) to batch_offset;
 *		false when it already is at or past it.  The row stays locked to the
 *		end of the transaction, so concurrent batches of one partition apply
 *		one at a time and each exactly once.
 */
static bool
claim_offset(text *source, int32 partition, int64 offset)
{
	static const char *sql =
		"INSERT INTO billing.ingest_offsets AS o (source, partition, last_offset) "
		"VALUES ($1, $2, $3) ON CONFLICT (source, partition) DO UPDATE "
		"SET last_offset = excluded.last_offset, applied_at = pg_catalog.now() "
		"WHERE o.last_offset OPERATOR(pg_catalog.<) excluded.last_offset";
	Datum		values[3];
	Oid			types[3] = {TEXTOID, INT4OID, INT8OID};
	bool		applied;
	int			ret;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	values[0] = PointerGetDatum(source);
	values[1] = Int32GetDatum(partition);
	values[2] = Int64GetDatum(offset);
	if (billing_distributed())
	{
		/*
		 * ingest_offsets is a reference table: Citus 13.2 crashes planning
		 * a generic plan of this upsert, so plan it with the values; and
		 * Citus takes only immutable functions in DO UPDATE SET, so now()
		 * comes in through the inserted row.
		 */
		ret = SPI_execute_with_args("INSERT INTO billing.ingest_offsets AS o "
									"(source, partition, last_offset, applied_at) "
									"VALUES ($1, $2, $3, pg_catalog.now()) "
									"ON CONFLICT (source, partition) DO UPDATE "
									"SET last_offset = excluded.last_offset, "
									"applied_at = excluded.applied_at "
									"WHERE o.last_offset OPERATOR(pg_catalog.<) excluded.last_offset",
									3, types, values, NULL, false, 0);
	}
	else
	{
		if (offset_plan == NULL)
		{
			SPIPlanPtr	plan = SPI_prepare_cursor(sql, 3, types, CURSOR_OPT_GENERIC_PLAN);

			if (plan == NULL)
				elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
			SPI_keepplan(plan);
			offset_plan = plan;
		}
		ret = SPI_execute_plan(offset_plan, values, NULL, false, 0);
	}
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not store the batch offset");
	applied = (SPI_processed == 1);
	SPI_finish();
		return applied;
}

/*
 * billing.ingest(source, partition, batch_offset, account_ids, meters,
 *				  quantities, ts, event_ids, dimensions)
 *		Apply a batch exactly once per (source, partition, batch_offset).
 */
Datum
billing_ingest(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum		out[3];
	bool		outnull[3] = {false, false, false};
	text	   *source;
	int32		partition;
	int64		offset;
	Datum	   *accts,
			   *meters,
			   *qtys,
			   *tss,
			   *ids = NULL,
			   *dims = NULL;
	bool	   *an,
			   *mn,
			   *qn,
			   *tn,
			   *idn = NULL,
			   *dn = NULL;
	int			n;
	IngestState *st;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);

	require_arg(fcinfo, 0, "source");
	require_arg(fcinfo, 1, "partition");
	require_arg(fcinfo, 2, "batch_offset");
	require_arg(fcinfo, 3, "account_ids");
	require_arg(fcinfo, 4, "meters");
	require_arg(fcinfo, 5, "quantities");
	require_arg(fcinfo, 6, "ts");
	source = PG_GETARG_TEXT_PP(0);
	partition = PG_GETARG_INT32(1);
	offset = PG_GETARG_INT64(2);

	n = array_elems(PG_GETARG_ARRAYTYPE_P(3), INT8OID, 8, true, TYPALIGN_DOUBLE,
					&accts, &an, -1, "account_ids", false);
	array_elems(PG_GETARG_ARRAYTYPE_P(4), TEXTOID, -1, false, TYPALIGN_INT,
				&meters, &mn, n, "meters", false);
	array_elems(PG_GETARG_ARRAYTYPE_P(5), NUMERICOID, -1, false, TYPALIGN_INT,
				&qtys, &qn, n, "quantities", false);
	array_elems(PG_GETARG_ARRAYTYPE_P(6), TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE,
				&tss, &tn, n, "ts", false);
	if (!PG_ARGISNULL(7))
		array_elems(PG_GETARG_ARRAYTYPE_P(7), TEXTOID, -1, false, TYPALIGN_INT,
					&ids, &idn, n, "event_ids", true);
	if (!PG_ARGISNULL(8))
		array_elems(PG_GETARG_ARRAYTYPE_P(8), TEXTOID, -1, false, TYPALIGN_INT,
					&dims, &dn, n, "dimensions", true);

	if (!claim_offset(source, partition, offset))
	{
		out[0] = Int32GetDatum(0);
		out[1] = Int32GetDatum(0);
		out[2] = BoolGetDatum(true);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, out, outnull);
		return (Datum) 0;
	}

	st = state_create(CurrentMemoryContext, Min(Max(n, 16), 1024));
	for (int i = 0; i < n; i++)
	{
		const char *m,
				   *e = NULL,
				   *d = "";
		int			ml,
					el = 0,
					dl = 0;

		text_arg(meters[i], &m, &ml);
		if (ids && !idn[i])
			text_arg(ids[i], &e, &el);
		if (dims && !dn[i])
			text_arg(dims[i], &d, &dl);
		add_report(st, DatumGetInt64(accts[i]), m, ml, qtys[i], NUMERICOID,
				   DatumGetTimestampTz(tss[i]), e, el, d, dl, MODE_QUEUE);
		maybe_flush(st);
	}
	flush_state(st);

	out[0] = Int32GetDatum((int32) st->counted);
	out[1] = Int32GetDatum((int32) st->duplicates);
	out[2] = BoolGetDatum(false);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, out, outnull);
	MemoryContextDelete(st->ctx);
	return (Datum) 0;
}

/*
 * billing.report_cumulative(source, account_id, meter, bucket_start, total,
 *							 dimension)
 *		Record a collector's running total for a bucket; the bucket counts
 *		the sum over sources of each source's greatest total.
 */
Datum
billing_report_cumulative(PG_FUNCTION_ARGS)
{
	IngestState *st;
	text	   *source;
	int64		account_id;
	text	   *meter;
	TimestampTz ts;
	Numeric		total;
	text	   *dim;
	const char *dstr = "";
	int			dlen = 0;
	MeterSlot  *slot;
	TimestampTz bucket;
	Datum		values[6];
	Oid			types[6] = {INT8OID, TEXTOID, TEXTOID, TIMESTAMPTZOID, TEXTOID, NUMERICOID};
	bool		new_source;
	Numeric		old_total;
	bool		isnull;
	int			cmp;

	require_arg(fcinfo, 0, "source");
	require_arg(fcinfo, 1, "account_id");
	require_arg(fcinfo, 2, "meter");
	require_arg(fcinfo, 3, "bucket_start");
	require_arg(fcinfo, 4, "total");
	source = PG_GETARG_TEXT_PP(0);
	account_id = PG_GETARG_INT64(1);
	meter = PG_GETARG_TEXT_PP(2);
	ts = PG_GETARG_TIMESTAMPTZ(3);
	total = PG_GETARG_NUMERIC(4);
	if (!PG_ARGISNULL(5))
	{
		dim = PG_GETARG_TEXT_PP(5);
		text_arg(PointerGetDatum(dim), &dstr, &dlen);
	}

	st = state_create(CurrentMemoryContext, 8);
	slot = state_slot(st, VARDATA_ANY(meter), VARSIZE_ANY_EXHDR(meter));
	if (slot->def.agg != AGG_SUM)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("meter \"%s\" does not add quantities", slot->name),
				 errdetail("Cumulative totals can only be reported for meters with aggregation 'sum'.")));

	/* validates total, timestamp and account like any report */
	(void) add_report(st, account_id, slot->name, strlen(slot->name),
					  NumericGetDatum(total), NUMERICOID, ts, NULL, 0,
					  dstr, dlen, MODE_CLAIM_NOW);
	check_accounts(&account_id, 1);
	bucket = bucket_of(ts, slot->def.width);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (cumulative_insert_plan == NULL)
	{
		SPIPlanPtr	ins = SPI_prepare_cursor(
											 "INSERT INTO billing.cumulative_reports "
											 "(account_id, meter, dimension, bucket_start, source, total) "
											 "VALUES ($1, $2, $3, $4, $5, 0) ON CONFLICT DO NOTHING",
											 5, types, CURSOR_OPT_GENERIC_PLAN);
		SPIPlanPtr	lck = SPI_prepare_cursor(
										   "SELECT total FROM billing.cumulative_reports "
										   "WHERE account_id OPERATOR(pg_catalog.=) $1 "
										   "AND meter OPERATOR(pg_catalog.=) $2 "
										   "AND dimension OPERATOR(pg_catalog.=) $3 "
										   "AND bucket_start OPERATOR(pg_catalog.=) $4 "
										   "AND source OPERATOR(pg_catalog.=) $5 FOR UPDATE",
										   5, types, CURSOR_OPT_GENERIC_PLAN);
		SPIPlanPtr	upd = SPI_prepare_cursor(
											 "UPDATE billing.cumulative_reports SET total = $6 "
											 "WHERE account_id OPERATOR(pg_catalog.=) $1 "
											 "AND meter OPERATOR(pg_catalog.=) $2 "
											 "AND dimension OPERATOR(pg_catalog.=) $3 "
											 "AND bucket_start OPERATOR(pg_catalog.=) $4 "
											 "AND source OPERATOR(pg_catalog.=) $5",
											 6, types, CURSOR_OPT_GENERIC_PLAN);
		if (!ins || !lck || !upd)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(ins);
		SPI_keepplan(lck);
		SPI_keepplan(upd);
		cumulative_insert_plan = ins;
		cumulative_lock_plan = lck;
		cumulative_update_plan = upd;
	}
	values[0] = Int64GetDatum(account_id);
	values[1] = PointerGetDatum(cstring_to_text(slot->name));
	values[2] = PointerGetDatum(cstring_to_text_with_len(dstr, dlen));
	values[3] = TimestampTzGetDatum(bucket);
	values[4] = PointerGetDatum(source);
	values[5] = NumericGetDatum(total);

	if (SPI_execute_plan(cumulative_insert_plan, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not record cumulative total");
	new_source = (SPI_processed == 1);
	if (SPI_execute_plan(cumulative_lock_plan, values, NULL, false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "could not lock cumulative total");
	old_total = DatumGetNumeric(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 1, &isnull));
	cmp = DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(total),
											NumericGetDatum(old_total)));
	if (cmp > 0)
	{
		if (SPI_execute_plan(cumulative_update_plan, values, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "could not update cumulative total");
	}
	SPI_finish();

	/* the accumulator holds the report; replace it by the increase */
	cells_reset(st->buckets);
	if (cmp > 0 || new_source)
	{
		BucketKey	key;
		Qty			inc;
		bool		notfinite;
		BucketAcc  *acc;

		memset(&key, 0, sizeof(key));
		key.account_id = account_id;
		key.meter = slot->id;
		key.dim = state_dim(st, dstr, dlen);
		key.bucket_start = bucket;
		qty_from_datum(DirectFunctionCall2(numeric_sub, NumericGetDatum(total),
										   NumericGetDatum(old_total)),
					   NUMERICOID, &inc, &notfinite);
		if (cmp <= 0)
		{
			inc.isdec = true;
			inc.dec = 0;
		}
		accumulate(st, &key, &inc, ts, 0);
		/* a source counts as one event, the first time it reports */
		acc = cells_lookup(st->buckets, key);
		acc->events = new_source ? 1 : 0;
		flush_state(st);
	}
	MemoryContextDelete(st->ctx);
	PG_RETURN_VOID();
}
