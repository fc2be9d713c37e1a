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
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/fmgroids.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "ingest.h"

#define KNOWN_ACCOUNTS_MAX 65536

/* saved plans */
static SPIPlanPtr check_accounts_plan = NULL;
static SPIPlanPtr citus_account_plan = NULL;

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

/* qsort order of int64 values */
static int
int64_cmp(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : (x > y ? 1 : 0);
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
	(void) billing_spi_plan(&check_accounts_plan, "SELECT a FROM pg_catalog.unnest($1) AS a "
							"WHERE NOT EXISTS (SELECT 1 FROM billing.accounts c "
							"WHERE c.account_id OPERATOR(pg_catalog.=) a) LIMIT 1",
							1, types, CURSOR_OPT_GENERIC_PLAN);
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
 *		array is overwritten.
 */
void
billing_check_new_accounts(KnownAccounts *known, int64 *accounts, long n)
{
	long		m = 0;

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
	if (known->hash)
	{
		hash_destroy(known->hash);
		known->hash = NULL;
	}
}
