/*
 * catalog.c
 *		The backend's cache of billing's catalog (as pg_cron keeps its job
 *		metadata apart from the scheduler): relation OIDs of the hot paths,
 *		the meter definitions of billing.meters, and whether billing is
 *		distributed by Citus.
 *
 * A relcache invalidation of a cached relation drops the OIDs and the Citus
 * answer (distributing a table sends one); one of billing.meters, which its
 * statement trigger billing_meters_changed sends on every change, drops the
 * meter cache.  A full reset drops everything.
 *
 * Work that needs the extension's rights (claiming event ids, writing
 * deltas, reading billing's tables) runs between billing_owner_begin and
 * billing_owner_end: as the extension owner, with search_path pinned, the
 * way PostgreSQL's referential-integrity triggers switch to a table's
 * owner.  The triggers on users' tables are not SECURITY DEFINER (SPEC
 * section 8): everything else they do, and every trigger of the user's
 * that fires around them, runs as the user.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/namespace.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "utils/acl.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "catalog.h"

PG_FUNCTION_INFO_V1(billing_meters_changed);
PG_FUNCTION_INFO_V1(billing_lock_table);

/* OIDs of the relations the hot paths open (see billing_relid) */
#define NUM_CACHED_RELS 6
static Oid	cached_rel_oids[NUM_CACHED_RELS];

static const char *const cached_rel_names[] = {
	"accounts", "accounts_pkey", "usage_deltas", "dedupe_keys", "dedupe_keys_pkey", "usage_seq"
};
StaticAssertDecl(lengthof(cached_rel_names) == NUM_CACHED_RELS,
				 "cached_rel_names and NUM_CACHED_RELS disagree");

/*
 * Is billing distributed by Citus (usage_deltas is a Citus table)?  -1:
 * not known yet; reset with the relation OID cache.
 */
static int	citus_mode = -1;

/*
 * Does the installed SQL read group rows of usage_deltas (cells.h)?  -1: not
 * known yet; reset with the relation OID cache.  billing.so also serves
 * installs whose readers do not (1.0), which get a row per account.
 */
static int	group_rows = -1;

/* backend cache of billing.meters */
static HTAB *meter_cache = NULL;
static Oid	meters_relid = InvalidOid;

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
		group_rows = -1;
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
 * billing_catalog_init
 *		Register the cache's invalidation callback (from _PG_init).
 */
void
billing_catalog_init(void)
{
	CacheRegisterRelcacheCallback(meters_relcache_cb, (Datum) 0);
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
Oid
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
 * billing_citus_table
 *		Is relid a Citus table?  Read from pg_dist_partition, when Citus is
 *		installed; not cached (callers cache the answer as they need).
 */
bool
billing_citus_table(Oid relid)
{
	Datum		values[1];
	Oid			types[1] = {OIDOID};
	bool		isnull;
	bool		dist;

	if (!OidIsValid(get_extension_oid("citus", true)))
		return false;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	values[0] = ObjectIdGetDatum(relid);
	if (SPI_execute_with_args("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition "
							  "WHERE logicalrelid OPERATOR(pg_catalog.=) $1)",
							  1, types, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read pg_dist_partition");
	dist = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
									  1, &isnull));
	SPI_finish();
	return dist;
}

/*
 * extension_owner
 *		The owner of extension billing (pg_extension.extowner), looked up once
 *		per transaction.
 */
static Oid
extension_owner(void)
{
	static LocalTransactionId owner_lxid = InvalidLocalTransactionId;
	static Oid	owner = InvalidOid;
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;

	if (OidIsValid(owner) && owner_lxid == MyProc->lxid)
		return owner;
	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum("billing"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (!HeapTupleIsValid(tup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"billing\" is not installed")));
	owner = ((Form_pg_extension) GETSTRUCT(tup))->extowner;
	owner_lxid = MyProc->lxid;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return owner;
}

/*
 * billing_owner_begin
 *		Run what follows as the extension owner with search_path pinned to
 *		BILLING_SEARCH_PATH, until billing_owner_end(scope), which must be
 *		called on the way out (scopes nest).  On an error in between, the
 *		abort of the (sub)transaction puts the user and search_path back, as
 *		for any SECURITY DEFINER function.
 */
void
billing_owner_begin(BillingOwnerScope *scope)
{
	Oid			owner = extension_owner();

	GetUserIdAndSecContext(&scope->save_userid, &scope->save_sec_context);

	/*
	 * Inside an enclosing scope, or a SECURITY DEFINER function of billing
	 * (record, ingest, ...), nothing is to change.
	 */
	scope->switched = !(scope->save_userid == owner &&
						strcmp(namespace_search_path, BILLING_SEARCH_PATH) == 0);
	if (!scope->switched)
		return;
	SetUserIdAndSecContext(owner, scope->save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	scope->save_nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", BILLING_SEARCH_PATH, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

/*
 * billing_owner_end
 *		Back to the user and search_path billing_owner_begin(scope) found.
 */
void
billing_owner_end(BillingOwnerScope *scope)
{
	if (!scope->switched)
		return;
	AtEOXact_GUC(false, scope->save_nestlevel);
	SetUserIdAndSecContext(scope->save_userid, scope->save_sec_context);
}

/*
 * billing_distributed
 *		Are billing's tables distributed by Citus?  Then the relations the
 *		ingest paths would open directly are shells on this node, and every
 *		access must go through statements that Citus routes to the shards.
 *		Known once per backend, again after an invalidation of a cached
 *		relation (distributing a table sends one).
 */
bool
billing_distributed(void)
{
	if (citus_mode < 0)
	{
		BillingOwnerScope	scope;

		billing_owner_begin(&scope);
		citus_mode = billing_citus_table(billing_relid("usage_deltas")) ? 1 : 0;
		billing_owner_end(&scope);
	}
	return citus_mode == 1;
}

/*
 * billing_group_rows
 *		May delta rows hold several accounts (group rows, cells.h)?  On one
 *		node, when the installed SQL reads them: it has the type
 *		billing.delta_row_cell that billing._delta_rows returns.
 */
bool
billing_group_rows(void)
{
	if (group_rows < 0)
	{
		Oid			nsp = get_namespace_oid("billing", true);

		group_rows = OidIsValid(nsp) &&
			OidIsValid(GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
									   CStringGetDatum("delta_row_cell"),
									   ObjectIdGetDatum(nsp))) ? 1 : 0;
	}
	return group_rows == 1 && !billing_distributed();
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
	BillingOwnerScope	scope;

	meters_relid = billing_relid("meters");

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = METER_NAME_LEN;
	ctl.entrysize = sizeof(MeterDef);
	ctl.hcxt = TopMemoryContext;
	cache = hash_create("billing meters", 64, &ctl,
						HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	/* a session that may not read billing.meters still meters its tables */
	billing_owner_begin(&scope);
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
		m->agg = billing_aggregation(agg);
		m->width = width->time + (int64) width->day * USECS_PER_DAY;
		m->late_window = *DatumGetIntervalP(SPI_getbinval(tup, desc, 4, &isnull));
		m->dedupe_window = *DatumGetIntervalP(SPI_getbinval(tup, desc, 5, &isnull));
	}
	SPI_finish();
	billing_owner_end(&scope);

	if (meter_cache)
		hash_destroy(meter_cache);
	meter_cache = cache;
}

/*
 * billing_lookup_meter
 *		The definition of a meter (key: its name, zero padded to
 *		METER_NAME_LEN), or NULL when it does not exist.
 */
MeterDef *
billing_lookup_meter(const char *key)
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
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("function \"%s\" was not called by trigger manager",
						"billing._meters_changed")));
	CacheInvalidateRelcacheByRelid(((TriggerData *) fcinfo->context)->tg_relation->rd_id);

	/*
	 * On Citus the trigger fires on a placement of the reference table
	 * (billing.meters_NNN); the caches key on billing.meters.
	 */
	if (((TriggerData *) fcinfo->context)->tg_relation->rd_id != billing_relid("meters"))
		CacheInvalidateRelcacheByRelid(billing_relid("meters"));
	return PointerGetDatum(NULL);
}

/*
 * billing._lock_table(rel regclass) RETURNS void
 *		SHARE UPDATE EXCLUSIVE on rel, on this node, to the end of the
 *		transaction: a lock one transaction at a time may hold, which does
 *		not conflict with reading or writing rows.  As LOCK TABLE, only for
 *		a role that may UPDATE, DELETE or TRUNCATE rel (42501 otherwise), so
 *		that a session outside billing cannot take it to hold billing's
 *		work off (an advisory lock, which any role may take, could).  On
 *		Citus the coordinator's lock alone (LOCK TABLE would lock every
 *		shard on every node).
 */
Datum
billing_lock_table(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);
	AclResult	acl;

	acl = pg_class_aclcheck(relid, GetUserId(), ACL_UPDATE | ACL_DELETE | ACL_TRUNCATE);
	if (acl != ACLCHECK_OK)
		aclcheck_error(acl, OBJECT_TABLE, get_rel_name(relid));
	LockRelationOid(relid, ShareUpdateExclusiveLock);
	PG_RETURN_VOID();
}
