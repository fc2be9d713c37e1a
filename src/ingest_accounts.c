/*
 * ingest_accounts.c
 *		Every account that usage is counted for must exist in
 *		billing.accounts: the check a flush makes for the accounts of its
 *		cells, and the accounts a statement has checked already.
 *
 * On one node the check probes the primary key of billing.accounts (one
 * account) or runs one kept anti-join over an array (several).  On Citus
 * billing.accounts is distributed, so the check is a query Citus routes to
 * the accounts' shards.
 *
 * A COPY of a million rows flushes dozens of times over the same accounts,
 * and each flush would look every one of them up again: the accounts a
 * statement's flushes have found are kept (KnownAccounts) until the
 * statement ends (billing_meter_flush), so a later statement checks again;
 * at most KNOWN_ACCOUNTS_MAX entries (about 2 MB), then no more are added.
 * They are kept from the second flush on: a statement that flushes once
 * has no use for them.
 *
 * On one node, in READ COMMITTED, the backend also keeps the accounts it
 * found across transactions (the account cache, at most ACCOUNT_CACHE_MAX):
 * a client sending batches of 10k events, each its own transaction, would
 * otherwise look up thousands of accounts per batch.  The cache is exact:
 *
 *	- every UPDATE, DELETE or TRUNCATE of billing.accounts fires the
 *	  statement trigger accounts_changed (ENABLE ALWAYS, so no
 *	  session_replication_role skips it), which sends a relcache
 *	  invalidation of billing.accounts (every backend drops its cache when
 *	  it reads it) and takes the account-cache lock (the object lock tag of
 *	  billing.accounts) in ShareLock mode to the end of its transaction:
 *	  it is released after the transaction is visible and its invalidation
 *	  sent.  Changes do not lock each other out (ShareLock is compatible
 *	  with itself), so they wait for nothing they did not wait for before
 *	  but checks running at that moment;
 *	- a check that uses the cache first takes that lock in RowExclusiveLock
 *	  mode (which conflicts with ShareLock, not with itself) without
 *	  waiting (else it checks without the cache, as on a 1.0 database or
 *	  when the trigger is not there and enabled always), reads the
 *	  invalidations, and holds the lock while it uses and fills the cache:
 *	  no change can then be committed and its invalidation not yet read;
 *	- an account missing from the cache is looked up as the statement sees
 *	  it (raising 23503 as without the cache), and cached only if its row
 *	  was inserted by another, so committed, transaction and no
 *	  transaction has deleted or updated it, committed or not (its xmax):
 *	  a change committed before the lock was taken, which the statement's
 *	  snapshot may not see, has set it; one not committed yet will send its
 *	  invalidation after the check.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_class.h"
#include "catalog/pg_trigger.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "utils/array.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "ingest.h"

#define KNOWN_ACCOUNTS_MAX 65536
/* accounts the account cache holds at most (about 4 MB) */
#define ACCOUNT_CACHE_MAX 131072
/* the trigger that keeps the account cache exact (10_reference.sql) */
#define ACCOUNTS_TRIGGER "accounts_changed"

PG_FUNCTION_INFO_V1(billing_accounts_changed);

/* saved plans */
static SPIPlanPtr check_accounts_plan = NULL;
static SPIPlanPtr citus_account_plan = NULL;

/*
 * The account cache: ids of accounts known to exist (int64 -> int64), in
 * its own context; NULL when empty.  An invalidation of billing.accounts
 * (or a full reset) only marks it stale (and counts, in cache_gen): the
 * check drops it when it next starts, never in the middle of its use.
 */
static HTAB *account_cache = NULL;
static MemoryContext account_cache_cxt = NULL;
static Oid	account_cache_relid = InvalidOid;
static bool account_cache_stale = false;
static uint64 account_cache_gen = 0;

/*
 * account_cache_cb
 *		Relcache callback: billing.accounts changed (or everything was
 *		reset): the account cache is stale.
 */
static void
account_cache_cb(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == account_cache_relid)
	{
		account_cache_stale = true;
		account_cache_gen++;
	}
}

/*
 * billing_accounts_cache_init
 *		Register the account cache's invalidation callback (from _PG_init).
 */
void
billing_accounts_cache_init(void)
{
	CacheRegisterRelcacheCallback(account_cache_cb, (Datum) 0);
}

/*
 * account_cache_locktag
 *		The lock tag of the account cache of relation relid
 *		(billing.accounts): the object lock tag of the relation, which
 *		PostgreSQL itself never takes for a relation.
 */
static void
account_cache_locktag(LOCKTAG *tag, Oid relid)
{
	SET_LOCKTAG_OBJECT(*tag, MyDatabaseId, RelationRelationId, relid, 0);
}

/*
 * billing.accounts_changed() (trigger)
 *		AFTER UPDATE, DELETE or TRUNCATE, for each statement, on
 *		billing.accounts: drop every backend's account cache (from the
 *		commit on) and hold the account-cache lock to the end of the
 *		transaction (see the file header).  On a Citus shard, where no
 *		cache is kept, nothing.
 */
Datum
billing_accounts_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Oid			relid;
	LOCKTAG		tag;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("function \"%s\" was not called by trigger manager",
						"billing._accounts_changed")));
	if (!TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("function \"%s\" must be fired AFTER ... FOR EACH STATEMENT",
						"billing._accounts_changed")));
	relid = RelationGetRelid(trigdata->tg_relation);
	if (relid != billing_relid("accounts"))
		return PointerGetDatum(NULL);
	account_cache_locktag(&tag, relid);
	(void) LockAcquire(&tag, ShareLock, false, false);
	CacheInvalidateRelcacheByRelid(relid);
	return PointerGetDatum(NULL);
}

/*
 * account_cache_guarded
 *		Is billing.accounts (rel) guarded by the trigger accounts_changed,
 *		on every event and always enabled?  Read from the relcache entry,
 *		which any change to its triggers invalidates.
 */
static bool
account_cache_guarded(Relation rel)
{
	TriggerDesc *td = rel->trigdesc;

	if (td == NULL)
		return false;
	for (int i = 0; i < td->numtriggers; i++)
	{
		Trigger    *t = &td->triggers[i];

		if (strcmp(t->tgname, ACCOUNTS_TRIGGER) == 0)
			return t->tgenabled == TRIGGER_FIRES_ALWAYS &&
				TRIGGER_FOR_AFTER(t->tgtype) && !TRIGGER_FOR_ROW(t->tgtype) &&
				TRIGGER_FOR_UPDATE(t->tgtype) && TRIGGER_FOR_DELETE(t->tgtype) &&
				TRIGGER_FOR_TRUNCATE(t->tgtype) && t->tgnattr == 0 &&
				t->tgqual == NULL;
	}
	return false;
}

/*
 * account_probe
 *		Is there a row for account_id in billing.accounts (rel) as snap
 *		sees it?  A direct probe of the primary key.
 */
static bool
account_probe(Relation rel, Snapshot snap, int64 account_id)
{
	ScanKeyData key;
	SysScanDesc scan;
	bool		found;

	ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(account_id));
	scan = systable_beginscan(rel, billing_relid("accounts_pkey"), true, snap, 1, &key);
	found = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);
	return found;
}

/*
 * account_exists
 *		Is there a row for account_id in billing.accounts (as the current
 *		command sees it)?
 */
static bool
account_exists(int64 account_id)
{
	Relation	rel = table_open(billing_relid("accounts"), AccessShareLock);
	bool		found = account_probe(rel, GetActiveSnapshot(), account_id);

	table_close(rel, AccessShareLock);
	return found;
}

/* raise the error of a missing account */
static void
account_missing(int64 account_id)
{
	ereport(ERROR,
			(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
			 errmsg("account %lld does not exist", (long long) account_id),
			 errhint("Accounts are defined in billing.accounts.")));
}

/*
 * row_cacheable
 *		May the row of an account, found as the statement sees it, enter
 *		the account cache?  Only if it was inserted by another transaction
 *		(so committed), and no transaction, even one the statement does not
 *		see, has deleted or updated it (its xmax is invalid or only a
 *		locker's).  The caller holds the account-cache lock: a change not
 *		yet made will send its invalidation after the caller is done.
 */
static inline bool
row_cacheable(HeapTupleHeader tup)
{
	uint16		infomask = tup->t_infomask;

	return !TransactionIdIsCurrentTransactionId(HeapTupleHeaderGetXmin(tup)) &&
		((infomask & HEAP_XMAX_INVALID) || HEAP_XMAX_IS_LOCKED_ONLY(infomask));
}

/* qsort order of int64 values */
static int
int64_cmp(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : (x > y ? 1 : 0);
}

/*
 * scan_missing
 *		probe_missing for many ids: one sequential scan of billing.accounts
 *		(rel), each row's id searched among ids (the hash anti-join the
 *		planner would choose).
 */
static void
scan_missing(Relation rel, const int64 *ids, long n, bool *cacheable)
{
	bool	   *found = palloc0(n * sizeof(bool));
	TableScanDesc scan = table_beginscan(rel, GetActiveSnapshot(), 0, NULL);
	TupleDesc	desc = RelationGetDescr(rel);
	HeapTuple	tup;

	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		bool		isnull;
		int64		id = DatumGetInt64(heap_getattr(tup, 1, desc, &isnull));
		const int64 *at = isnull ? NULL : bsearch(&id, ids, n, sizeof(int64), int64_cmp);

		/* ids is sorted */
		if (at != NULL)
		{
			found[at - ids] = true;
			cacheable[at - ids] = row_cacheable(tup->t_data);
		}
	}
	table_endscan(scan);
	for (long i = 0; i < n; i++)
		if (!found[i])
			account_missing(ids[i]);
	pfree(found);
}

/*
 * probe_missing
 *		Look the accounts ids[0..n) (sorted, distinct) up in billing.accounts
 *		(rel) as the statement sees them; raise 23503 for the first that is
 *		missing.  Sets cacheable[i] to whether the row found may enter the
 *		account cache (row_cacheable).  One index scan rescanned per id, or
 *		for many ids (more than about five per page of the table, where a
 *		probe costs more than reading the pages) scan_missing.
 */
static void
probe_missing(Relation rel, const int64 *ids, long n, bool *cacheable)
{
	Relation	idx;
	TupleTableSlot *slot;
	IndexScanDesc scan;
	ScanKeyData key;

	if (n > 5 * (long) RelationGetNumberOfBlocks(rel))
	{
		scan_missing(rel, ids, n, cacheable);
		return;
	}
	idx = index_open(billing_relid("accounts_pkey"), AccessShareLock);
	slot = table_slot_create(rel, NULL);
	scan = index_beginscan(rel, idx, GetActiveSnapshot(), 1, 0);
	for (long i = 0; i < n; i++)
	{
		HeapTuple	tup;
		bool		should_free;

		ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(ids[i]));
		index_rescan(scan, &key, 1, NULL, 0);
		if (!index_getnext_slot(scan, ForwardScanDirection, slot))
			account_missing(ids[i]);
		tup = ExecFetchSlotHeapTuple(slot, false, &should_free);
		cacheable[i] = row_cacheable(tup->t_data);
		if (should_free)
			heap_freetuple(tup);
		ExecClearTuple(slot);
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	index_close(idx, AccessShareLock);
}

/*
 * check_accounts_cached
 *		check_accounts through the account cache (see the file header).
 *		Returns false, having checked nothing, when the cache cannot be
 *		used now.
 */
static bool
check_accounts_cached(const int64 *accounts, long n)
{
	Oid			relid = billing_relid("accounts");
	Relation	rel;
	LOCKTAG		tag;
	int64	   *miss;
	long		nmiss = 0;
	uint64		gen;

	/* the snapshot of a REPEATABLE READ transaction may be older than the cache */
	if (IsolationUsesXactSnapshot())
		return false;
	rel = table_open(relid, AccessShareLock);
	if (!account_cache_guarded(rel))
	{
		table_close(rel, AccessShareLock);
		return false;
	}
	account_cache_locktag(&tag, relid);
	if (LockAcquire(&tag, RowExclusiveLock, false, true) == LOCKACQUIRE_NOT_AVAIL)
	{
		/* an account is being changed: check without the cache */
		table_close(rel, AccessShareLock);
		return false;
	}
	AcceptInvalidationMessages();
	if (account_cache_stale || account_cache_relid != relid)
	{
		if (account_cache_cxt)
			MemoryContextDelete(account_cache_cxt);
		account_cache_cxt = NULL;
		account_cache = NULL;
		account_cache_relid = relid;
		account_cache_stale = false;
	}
	gen = account_cache_gen;

	/* the accounts not cached, looked up as the statement sees them */
	miss = palloc(n * sizeof(int64));
	for (long i = 0; i < n; i++)
	{
		bool		found = false;

		if (i > 0 && accounts[i] == accounts[i - 1])
			continue;
		if (account_cache)
			hash_search(account_cache, &accounts[i], HASH_FIND, &found);
		if (!found)
			miss[nmiss++] = accounts[i];
	}
	if (nmiss > 0)
	{
		bool	   *cacheable = palloc(nmiss * sizeof(bool));

		probe_missing(rel, miss, nmiss, cacheable);
		if (account_cache == NULL)
		{
			HASHCTL		ctl;

			account_cache_cxt = AllocSetContextCreate(TopMemoryContext, "billing account cache",
													  ALLOCSET_DEFAULT_SIZES);
			memset(&ctl, 0, sizeof(ctl));
			ctl.keysize = sizeof(int64);
			ctl.entrysize = sizeof(int64);
			ctl.hcxt = account_cache_cxt;
			account_cache = hash_create("billing account cache", 1024, &ctl,
										HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		}
		/* an invalidation read while probing: cache nothing this time */
		for (long i = 0; i < nmiss && account_cache_gen == gen && !account_cache_stale &&
			 hash_get_num_entries(account_cache) < ACCOUNT_CACHE_MAX; i++)
			if (cacheable[i])
				hash_search(account_cache, &miss[i], HASH_ENTER, NULL);
		pfree(cacheable);
	}
	pfree(miss);
	LockRelease(&tag, RowExclusiveLock, false);
	table_close(rel, AccessShareLock);
	return true;
}

/*
 * check_accounts_citus
 *		billing_check_accounts on Citus: billing.accounts is distributed, so ask
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

		(void) billing_spi_plan(&citus_account_plan, "SELECT 1 FROM billing.accounts "
								"WHERE account_id OPERATOR(pg_catalog.=) $1",
								1, types, 0);
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
 *		Raise 23503 when one of the n (> 0) account ids (sorted, so that
 *		repeats are adjacent) does not exist in billing.accounts.
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
	if (check_accounts_cached(accounts, n))
		return;
	if (accounts[0] == accounts[n - 1])
	{
		/* one account (record, report_cumulative, small batches) */
		if (!account_exists(accounts[0]))
			account_missing(accounts[0]);
		return;
	}
	ids = palloc(n * sizeof(Datum));
	for (i = 0; i < n; i++)
		if (i == 0 || accounts[i] != accounts[i - 1])
			ids[m++] = Int64GetDatum(accounts[i]);
	values[0] = PointerGetDatum(construct_array(ids, m, INT8OID, 8, true, TYPALIGN_DOUBLE));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	(void) billing_spi_plan(&check_accounts_plan, "SELECT a FROM pg_catalog.unnest($1) AS a "
							"WHERE NOT EXISTS (SELECT 1 FROM billing.accounts c "
							"WHERE c.account_id OPERATOR(pg_catalog.=) a) LIMIT 1",
							1, types, CURSOR_OPT_GENERIC_PLAN);
	if (SPI_execute_plan(check_accounts_plan, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not check accounts");
	if (SPI_processed > 0)
	{
		bool		isnull;
		account_missing(DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
													SPI_tuptable->tupdesc, 1, &isnull)));
	}
	SPI_finish();
	pfree(ids);
}

/*
 * billing_check_accounts
 *		Raise 23503 when one of the n account ids (sorted, so that repeats
 *		are adjacent) does not exist in billing.accounts, reading it with
 *		the extension owner's rights.
 */
void
billing_check_accounts(const int64 *accounts, long n)
{
	BillingOwnerScope	scope;

	if (n == 0)
		return;
	billing_owner_begin(&scope);
	check_accounts(accounts, n);
	billing_owner_end(&scope);
}

/*
 * billing_check_new_accounts
 *		billing_check_accounts for the accounts[0..n) (sorted, distinct)
 *		that this statement has not checked yet, then remember them.  The
 *		array is overwritten.  The first flush of a statement remembers
 *		nothing: most statements (an ingest() batch, a small COPY) flush
 *		once, and would fill a hash table of thousands of accounts only to
 *		drop it; a second flush checks its accounts and remembers them.
 */
void
billing_check_new_accounts(KnownAccounts *known, int64 *accounts, long n)
{
	long		m = 0;

	if (!known->checked)
	{
		known->checked = true;
		billing_check_accounts(accounts, n);
		return;
	}
	for (long i = 0; i < n; i++)
	{
		bool		found = false;

		if (known->hash)
			hash_search(known->hash, &accounts[i], HASH_FIND, &found);
		if (!found)
			accounts[m++] = accounts[i];
	}
	billing_check_accounts(accounts, m);

	/* they exist: remember them */
	if (known->hash == NULL)
	{
		HASHCTL		ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(int64);
		ctl.entrysize = sizeof(int64);
		ctl.hcxt = known->cxt;
		known->hash = hash_create("billing known accounts", 1024, &ctl,
								  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	for (long i = 0; i < m && hash_get_num_entries(known->hash) < KNOWN_ACCOUNTS_MAX; i++)
		hash_search(known->hash, &accounts[i], HASH_ENTER, NULL);
}

/*
 * billing_forget_accounts
 *		The statement ended: its account checks no longer hold.
 */
void
billing_forget_accounts(KnownAccounts *known)
{
	known->checked = false;
	if (known->hash)
	{
		hash_destroy(known->hash);
		known->hash = NULL;
	}
}
