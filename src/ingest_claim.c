/*
 * ingest_claim.c
 *		Dedupe claims: an event id is counted once per (account, meter)
 *		within its meter's dedupe window, claimed in billing.dedupe_keys in
 *		the same transaction as the count.
 *
 * record() claims its id at once (billing_claim_now).  Batches (ingest(),
 * metered COPY) queue their reports with their ids (billing_claim_queue);
 * the flush claims the whole queue at once, sorted by (account, meter
 * name, event id) so that concurrent batches take their claims in one
 * order and cannot deadlock, and counts the reports whose ids this
 * transaction won.  The claim itself goes straight into the heap and index
 * of billing.dedupe_keys when it can (ingest_claim_direct.c), else through
 * one INSERT ... ON CONFLICT DO NOTHING RETURNING (here), which is also the
 * way on Citus.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "ingest.h"

PG_FUNCTION_INFO_V1(billing_oldest_xact_start);

/* saved plans */
static SPIPlanPtr claim_batch_plan = NULL;
static SPIPlanPtr claim_one_plan = NULL;

/*
 * billing_claim_queue
 *		Queue a validated report until its event id is claimed with the
 *		batch at the next flush.  The queue keeps copies of the quantity and
 *		the id.
 */
void
billing_claim_queue(ClaimQueue *q, const BucketKey *key, const Qty *v,
					TimestampTz ts, int64 ord, const char *event_id, int event_len)
{
	PendingRow *p;
	MemoryContext old = MemoryContextSwitchTo(q->cxt);

	if (q->npending == q->maxpending)
		q->pending = billing_grow(q->pending, &q->maxpending, sizeof(PendingRow), 256,
								  q->cxt);
	p = &q->pending[q->npending++];
	p->key = *key;
	p->value.isdec = true;
	p->value.num = NULL;
	billing_qty_store(&p->value, v, q->cxt);
	p->ts = ts;
	p->ord = ord;
	p->event_id = palloc(event_len + 1);
	memcpy(p->event_id, event_id, event_len);
	p->event_id[event_len] = '\0';
	p->event_len = event_len;
	q->pending_bytes += sizeof(PendingRow) + event_len + 1 + 16;
	MemoryContextSwitchTo(old);
}

/*
 * billing_claim_now
 *		Claim one event id now (INSERT ... ON CONFLICT DO NOTHING), with the
 *		extension owner's rights; true if this transaction claimed it, else
 *		it counts as a duplicate.
 */
bool
billing_claim_now(ClaimQueue *q, int64 account_id, const MeterSlot *slot,
				  const char *id, int len)
{
	Datum		values[4];
	Oid			types[4] = {INT8OID, TEXTOID, TEXTOID, TIMESTAMPTZOID};
	bool		claimed;
	BillingOwnerScope	scope;

	billing_owner_begin(&scope);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	(void) billing_spi_plan(&claim_one_plan, "INSERT INTO billing.dedupe_keys (account_id, meter, event_id, expires_at) "
							"VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
							4, types, CURSOR_OPT_GENERIC_PLAN);
	values[0] = Int64GetDatum(account_id);
	values[1] = PointerGetDatum(cstring_to_text(slot->name));
	values[2] = PointerGetDatum(cstring_to_text_with_len(id, len));
	values[3] = TimestampTzGetDatum(slot->expires);
	if (SPI_execute_plan(claim_one_plan, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not claim event id");
	claimed = (SPI_processed == 1);
	SPI_finish();
	billing_owner_end(&scope);
	if (!claimed)
		q->duplicates++;
	return claimed;
}

/* the accumulator whose queue pending_cmp sorts (for its meter names) */
static const Accum *sort_acc;

/*
 * pending_cmp
 *		Order of queued reports: (account, meter name, event id), then
 *		arrival, so that every batch claims in one order.
 */
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
		const MeterSlot *xm = sort_acc->slots[x->key.meter];
		const MeterSlot *ym = sort_acc->slots[y->key.meter];

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
claim_keys_spi(ClaimQueue *q, Accum *acc, const int *first, int nkeys, bool *won)
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
		PendingRow *p = &q->pending[first[j]];
		MeterSlot  *slot = acc->slots[p->key.meter];

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
		(void) billing_spi_plan(&claim_batch_plan, CLAIM_BATCH_SQL, 4, types,
								CURSOR_OPT_GENERIC_PLAN);
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
		ret[j].key.meter = billing_acc_slot(acc, VARDATA_ANY(m), VARSIZE_ANY_EXHDR(m))->id;
		ret[j].event_len = VARSIZE_ANY_EXHDR(id);
		ret[j].event_id = SPI_palloc(ret[j].event_len + 1);
		memcpy(ret[j].event_id, VARDATA_ANY(id), ret[j].event_len);
	}
	SPI_finish();
	qsort(ret, nret, sizeof(PendingRow), pending_cmp);

	/* merge: a key was won when it comes back from RETURNING */
	for (j = 0, k = 0; j < nkeys && k < nret; j++)
	{
		PendingRow *p = &q->pending[first[j]];

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

/*
 * billing_claim_pending
 *		Claim every queued event id, in key order (so that concurrent
 *		batches cannot deadlock), and count the reports whose ids this
 *		transaction claimed.  Repeats within the batch are sorted next to
 *		each other; the first to arrive is the one claimed.
 */
void
billing_claim_pending(IngestState *st)
{
	ClaimQueue *q = &st->claims;
	Size		budget = (Size) work_mem * 1024;
	int			n = q->npending;
	int			nkeys = 0;
	int		   *first;			/* per key: index of its first report */
	bool	   *won;			/* per key: claimed by this transaction */
	int			j,
				k;

	if (n == 0)
		return;
	sort_acc = &st->acc;
	qsort(q->pending, n, sizeof(PendingRow), pending_cmp);

	first = palloc(n * sizeof(int));
	for (j = 0; j < n; j++)
		if (j == 0 || !pending_same_key(&q->pending[j], &q->pending[j - 1]))
			first[nkeys++] = j;

	won = palloc0(nkeys * sizeof(bool));
	/* on Citus dedupe_keys is a shell here: claim through Citus */
	if (billing_distributed() || !billing_claim_direct(q, &st->acc, first, nkeys, won))
		claim_keys_spi(q, &st->acc, first, nkeys, won);

	/*
	 * Count the winners.  The queue takes most of the budget, so the cell
	 * table is written out whenever it would outgrow the rest; the queue
	 * is in account order, so each write covers its own accounts.
	 */
	for (j = 0, k = -1; j < n; j++)
	{
		PendingRow *p = &q->pending[j];

		if (k + 1 < nkeys && first[k + 1] == j)
		{
			k++;
			if (won[k])
			{
				if (cells_at_limit(st, budget))
					billing_flush_cells(st, false);
				billing_acc_add(&st->acc, &p->key, &p->value, p->ts, p->ord);
			}
			else
				q->duplicates++;
		}
		else
			q->duplicates++;	/* a repeat within the batch */
		if (!p->value.isdec && p->value.num)
			pfree(p->value.num);
		pfree(p->event_id);
	}
	pfree(won);
	pfree(first);
	q->npending = 0;
	q->pending_bytes = 0;
}

/*
 * billing._oldest_xact_start() -> timestamptz
 *		The earliest start of a transaction still open in this database, in
 *		a client backend or a background worker (the ones that can report
 *		usage), this one's included.  A transaction judges a report's
 *		lateness by its own start (now()), so purge_dedupe must not forget
 *		an id that a transaction started before its cutoff could still
 *		accept.  Read from the backends' status in shared memory, which
 *		every role sees whole here (pg_stat_activity hides other roles'
 *		transactions from most).  A backend that does not report its
 *		transactions (track_activities off) counts from its own start, the
 *		earliest its transaction can have begun.
 */
Datum
billing_oldest_xact_start(PG_FUNCTION_ARGS)
{
	TimestampTz oldest = GetCurrentTransactionStartTimestamp();
	int			n = pgstat_fetch_stat_numbackends();

	for (int i = 1; i <= n; i++)
	{
		LocalPgBackendStatus *l = pgstat_fetch_stat_local_beentry(i);
		PgBackendStatus *b;
		TimestampTz start;

		if (l == NULL)
			continue;
		b = &l->backendStatus;
		if (b->st_procpid <= 0 || b->st_databaseid != MyDatabaseId ||
			(b->st_backendType != B_BACKEND && b->st_backendType != B_BG_WORKER))
			continue;
		if (b->st_state == STATE_DISABLED)
			start = b->st_proc_start_timestamp;	/* not reported: no earlier than this */
		else if (b->st_xact_start_timestamp != 0)
			start = b->st_xact_start_timestamp;
		else
			continue;			/* no transaction open */
		if (start != 0 && start < oldest)
			oldest = start;
	}
	PG_RETURN_TIMESTAMPTZ(oldest);
}
