/*
 * ingest_accum.c
 *		The accumulator of usage ingest: exact quantities, the meters and
 *		dimensions a statement uses, validating one report, and the counter
 *		cells per (account, meter, dimension, bucket) that a flush writes.
 *
 * billing_report is the one door every ingest path (record, ingest, the
 * metered-table triggers, report_cumulative) sends a report through: it
 * raises the SPEC section 3 errors for bad input, then counts the report or
 * hands its event id to the claims (ingest_claim.c).
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "common/int.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "agg.h"
#include "billing.h"
#include "ingest.h"

/* ---------------------------------------------------------------------
 * Quantities
 * ---------------------------------------------------------------------
 */

/*
 * billing_qty_from_datum
 *		Read a quantity of type numeric, int2, int4 or int8.  Sets
 *		*notfinite when it is NaN or infinite.
 */
void
billing_qty_from_datum(Datum d, Oid type, Qty *q, bool *notfinite)
{
	*notfinite = false;
	q->num = NULL;
	switch (type)
	{
		case INT2OID:
			q->isdec = true;
			q->dec = (int128_t) DatumGetInt16(d) * billing_dec_pow10[QTY_SCALE];
			return;
		case INT4OID:
			q->isdec = true;
			q->dec = (int128_t) DatumGetInt32(d) * billing_dec_pow10[QTY_SCALE];
			return;
		case INT8OID:
			q->isdec = true;
			q->dec = (int128_t) DatumGetInt64(d) * billing_dec_pow10[QTY_SCALE];
			return;
		default:
			{
				/*
				 * Read the value where it lies: a numeric stored in a row
				 * has a 1-byte header, which DatumGetNumeric would copy to
				 * a 4-byte one.  Only a value the 128-bit decimal cannot
				 * hold is detoasted for numeric's own functions.
				 */
				Numeric		n = (Numeric) PG_DETOAST_DATUM_PACKED(d);
				int			dscale;
				int			kind = billing_dec_numeric_classify(n, &dscale);

				if (kind == DEC_NUM_NAN || kind == DEC_NUM_PINF || kind == DEC_NUM_NINF)
				{
					*notfinite = true;
					q->isdec = false;
					return;
				}
				q->isdec = billing_dec_from_numeric(n, QTY_SCALE, &q->dec);
				if (!q->isdec)
					q->num = DatumGetNumeric(d);
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
		return billing_dec_to_numeric(q->dec, QTY_SCALE);
	return q->num;
}

/* the sign of a quantity: -1, 0 or 1 */
static int
qty_sign(const Qty *q)
{
	if (q->isdec)
		return q->dec > 0 ? 1 : (q->dec < 0 ? -1 : 0);
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(q->num),
											 NumericGetDatum(int64_to_numeric(0))));
}

/* the order of two quantities: -1, 0 or 1 */
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
 * billing_qty_store
 *		Copy *src into *dst, keeping any numeric in cxt (and freeing the
 *		numeric *dst held).
 */
void
billing_qty_store(Qty *dst, const Qty *src, MemoryContext cxt)
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

	if (acc->isdec && v->isdec && billing_dec_add(acc->dec, v->dec, &r.dec))
	{
		acc->dec = r.dec;
		return;
	}
	r.isdec = false;
	r.num = DatumGetNumeric(DirectFunctionCall2(numeric_add,
												NumericGetDatum(qty_numeric(acc)),
												NumericGetDatum(qty_numeric(v))));
	billing_qty_store(acc, &r, cxt);
}

/* ---------------------------------------------------------------------
 * Meters, dimensions and counter cells
 * ---------------------------------------------------------------------
 */

/*
 * billing_acc_init
 *		An empty accumulator in cxt, its cell table in cells_cxt (a child of
 *		cxt): cells, an empty table allocated there, or a new one with room
 *		for ncells cells to start.
 */
void
billing_acc_init(Accum *acc, MemoryContext cxt, MemoryContext cells_cxt,
				 bucket_hash *cells, uint32 ncells)
{
	HASHCTL		ctl;

	acc->cxt = cxt;
	acc->cells_cxt = cells_cxt;
	acc->now = GetCurrentTransactionStartTimestamp();

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = METER_NAME_LEN;
	ctl.entrysize = sizeof(MeterSlot);
	ctl.hcxt = cxt;
	acc->meters = hash_create("billing ingest meters", 16, &ctl,
							  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(uint32);
	ctl.entrysize = sizeof(DimEntry);
	ctl.hcxt = cxt;
	acc->dimhash = hash_create("billing ingest dimensions", 16, &ctl,
							   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	acc->buckets = cells ? cells : bucket_create(cells_cxt, ncells, NULL);
	acc->nahead = 0;
	acc->ahead_next = 0;
}

/*
 * billing_acc_slot
 *		The accumulator's slot for a meter, given its name as bytes;
 *		raises 23503 for an unknown meter.
 */
MeterSlot *
billing_acc_slot(Accum *acc, const char *name, int len)
{
	char		key[METER_NAME_LEN];
	MeterSlot  *slot;
	bool		found;

	/* a batch uses a handful of meters: compare before hashing */
	for (int i = 0; i < acc->nslots; i++)
	{
		slot = acc->slots[i];
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

	slot = hash_search(acc->meters, key, HASH_ENTER, &found);
	if (!found)
	{
		MeterDef   *def = billing_lookup_meter(key);

		if (def == NULL)
		{
			hash_search(acc->meters, key, HASH_REMOVE, NULL);
			ereport(ERROR,
					(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
					 errmsg("meter \"%s\" does not exist", key),
					 errhint("Meters are defined in billing.meters.")));
		}
		slot->def = *def;
		slot->namelen = strlen(key);
		slot->oldest = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_mi_interval,
															   TimestampTzGetDatum(acc->now),
															   IntervalPGetDatum(&def->late_window)));
		slot->expires = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
																TimestampTzGetDatum(acc->now),
																IntervalPGetDatum(&def->dedupe_window)));
		if (acc->nslots == acc->maxslots)
			acc->slots = billing_grow(acc->slots, &acc->maxslots, sizeof(MeterSlot *), 8,
									  acc->cxt);
		slot->id = acc->nslots;
		acc->slots[acc->nslots++] = slot;
	}
	return slot;
}

/*
 * billing_acc_dim
 *		Intern a dimension string; returns its id.
 */
int32
billing_acc_dim(Accum *acc, const char *s, int len)
{
	uint32		h;
	DimEntry   *e;
	bool		found;
	MemoryContext old;

	/* most reports repeat the previous dimension (usually '') */
	if (acc->ndims > 0)
	{
		e = acc->dims[acc->last_dim];
		if (e->len == len && memcmp(e->str, s, len) == 0)
			return e->id;
	}
	h = hash_bytes((const unsigned char *) s, len);

	/* linear probing on the hash value keeps collisions exact */
	for (;;)
	{
		e = hash_search(acc->dimhash, &h, HASH_ENTER, &found);
		if (!found)
			break;
		if (e->len == len && memcmp(e->str, s, len) == 0)
		{
			acc->last_dim = e->id;
			return e->id;
		}
		h++;
	}
	old = MemoryContextSwitchTo(acc->cxt);
	e->str = palloc(len + 1);
	memcpy(e->str, s, len);
	e->str[len] = '\0';
	e->len = len;
	MemoryContextSwitchTo(old);
	if (acc->ndims == acc->maxdims)
		acc->dims = billing_grow(acc->dims, &acc->maxdims, sizeof(DimEntry *), 8, acc->cxt);
	e->id = acc->ndims;
	acc->dims[acc->ndims++] = e;
	acc->last_dim = e->id;
	return e->id;
}

#if defined(__GNUC__) || defined(__clang__)
#define acc_prefetch(p)	__builtin_prefetch(p)
#else
#define acc_prefetch(p)	((void) 0)
#endif

/*
 * acc_add_now
 *		Add one report to its cell, whose key hashes to hash.
 */
static void
acc_add_now(Accum *acc, const BucketKey *key, uint32 hash, const Qty *v, TimestampTz ts,
			int32 ord)
{
	BucketAcc  *cell;
	bool		found;
	Aggregation agg = acc->slots[key->meter]->def.agg;
	Qty			q;

	cell = bucket_insert_hash(acc->buckets, *key, hash, &found);
	if (!found)
	{
		cell->events = 1;
		cell->last_ts = ts;
		cell->last_ord = ord;
		q.isdec = true;
		q.dec = 0;
		q.num = NULL;
		if (agg == AGG_COUNT)
			q.dec = billing_dec_pow10[QTY_SCALE];
		else
			billing_qty_store(&q, v, acc->cxt);
		cell_set_qty(cell, &q);
		acc->numeric_cells |= !q.isdec;
		return;
	}

	if (pg_add_s64_overflow(cell->events, 1, &cell->events))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("event count of a usage bucket is out of range")));

	cell_qty(cell, &q);
	switch (agg)
	{
		case AGG_SUM:
			qty_add(&q, v, acc->cxt);
			break;
		case AGG_COUNT:
			{
				Qty			one = {true, billing_dec_pow10[QTY_SCALE], NULL};

				qty_add(&q, &one, acc->cxt);
			}
			break;
		case AGG_MAX:
			if (qty_cmp(v, &q) > 0)
				billing_qty_store(&q, v, acc->cxt);
			break;
		case AGG_LAST:
			/* the tie rule of agg.h: the later arrival wins */
			if (billing_last_later(ts, ord, cell->last_ts, cell->last_ord))
			{
				billing_qty_store(&q, v, acc->cxt);
				cell->last_ts = ts;
				cell->last_ord = ord;
			}
			break;
	}
	cell_set_qty(cell, &q);
	acc->numeric_cells |= !q.isdec;
}

/* add the waiting report a to its cell */
static inline void
acc_add_ahead(Accum *acc, const AccAhead *a)
{
	Qty			v;

	v.isdec = true;
	memcpy(&v.dec, a->dec, sizeof(v.dec));
	v.num = NULL;
	acc_add_now(acc, &a->key, a->hash, &v, a->ts, a->ord);
}

/*
 * billing_acc_add
 *		Count one report (already validated and claimed): now when its
 *		quantity is a numeric, else ACC_AHEAD reports later (or at
 *		billing_acc_settle), its cell's bucket being loaded meanwhile (see
 *		AccAhead in ingest.h).  acc->counted counts it at once.
 */
void
billing_acc_add(Accum *acc, const BucketKey *key, const Qty *v, TimestampTz ts,
				int64 ord)
{
	uint32		hash = bucketkey_hash(key);
	AccAhead   *a;

	Assert(ord >= 0 && ord <= MAX_TABLE_REPORTS);
	acc->counted++;
	if (!v->isdec)
	{
		acc_add_now(acc, key, hash, v, ts, (int32) ord);
		return;
	}
	acc_prefetch(&acc->buckets->data[hash & acc->buckets->sizemask]);
	if (acc->nahead < ACC_AHEAD)
		a = &acc->ahead[acc->nahead++];
	else
	{
		/* the oldest has waited ACC_AHEAD reports: add it, take its place */
		a = &acc->ahead[acc->ahead_next];
		acc_add_ahead(acc, a);
		acc->ahead_next = (acc->ahead_next + 1) % ACC_AHEAD;
	}
	a->key = *key;
	memcpy(a->dec, &v->dec, sizeof(a->dec));
	a->ts = ts;
	a->ord = (int32) ord;
	a->hash = hash;
}

/*
 * billing_acc_settle
 *		Add the reports still on their way to their cells: before anything
 *		reads, writes or empties the cell table.
 */
void
billing_acc_settle(Accum *acc)
{
	int			n = acc->nahead;
	int			first = n < ACC_AHEAD ? 0 : acc->ahead_next;

	/* emptied first: an error below leaves no report to add twice */
	acc->nahead = 0;
	acc->ahead_next = 0;
	for (int i = 0; i < n; i++)
		acc_add_ahead(acc, &acc->ahead[(first + i) % ACC_AHEAD]);
}

/*
 * billing_acc_discard
 *		Empty the cell table and forget the reports on their way.
 */
void
billing_acc_discard(Accum *acc)
{
	acc->nahead = 0;
	acc->ahead_next = 0;
	bucket_reset(acc->buckets);
}

/* ---------------------------------------------------------------------
 * Reports
 * ---------------------------------------------------------------------
 */

/*
 * billing_report
 *		Validate one usage report, then, by mode: count it or queue its event
 *		id for the batch claim at flush (MODE_QUEUE), claim its id now and
 *		count it if claimed (MODE_CLAIM_NOW), only claim (MODE_CLAIM_ONLY),
 *		or only count (MODE_COUNT_ONLY).  Raises the SPEC section 3 errors
 *		for bad input.
 */
ReportResult
billing_report(IngestState *st, int64 account_id, const char *meter, int meterlen,
			   Datum qty, Oid qtytype, TimestampTz ts,
			   const char *event_id, int event_len,
			   const char *dim, int dimlen, ReportMode mode)
{
	Accum	   *acc = &st->acc;
	int64		ord = ++acc->nreports;
	MeterSlot  *slot = billing_acc_slot(acc, meter, meterlen);
	BucketKey	key;
	Qty			v;
	bool		notfinite;

	billing_qty_from_datum(qty, qtytype, &v, &notfinite);
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
	if (ts < slot->oldest || ts > acc->now + FUTURE_SLACK_USEC ||
		TIMESTAMP_NOT_FINITE(ts))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_DATETIME_FORMAT),
				 errmsg("usage timestamp %s is outside the accepted window",
						TIMESTAMP_NOT_FINITE(ts) ? "(infinite)" : pstrdup(timestamptz_to_str(ts))),
				 errdetail("Meter \"%s\" accepts reports from %s (its late window) to 5 minutes ahead of %s.",
						   slot->name, pstrdup(timestamptz_to_str(slot->oldest)),
						   pstrdup(timestamptz_to_str(acc->now)))));
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
	key.dim = billing_acc_dim(acc, dim, dimlen);
	key.bucket_start = billing_bin_start(ts, slot->def.width);

	if (event_id != NULL && mode != MODE_COUNT_ONLY)
	{
		if (mode != MODE_QUEUE)
		{
			if (!billing_claim_now(&st->claims, account_id, slot, event_id, event_len))
				return REPORT_DUPLICATE;
		}
		else
		{
			billing_claim_queue(&st->claims, &key, &v, ts, ord, event_id, event_len);
			return REPORT_PENDING;
		}
	}
	if (mode != MODE_CLAIM_ONLY)
		billing_acc_add(acc, &key, &v, ts, ord);
	return REPORT_COUNTED;
}
