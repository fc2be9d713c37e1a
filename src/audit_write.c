/*
 * audit_write.c
 *		The relations appends write (billing.audit_log, billing.audit_heads)
 *		and how: what this backend knows about them, acting as their owner,
 *		the append through SQL (lock and read the head, insert the row,
 *		write the head), and the write of buffered rows straight into
 *		billing.audit_log's heap and primary key.
 *
 * The writes need the rights of the extension's owner.  Callers from SQL
 * must hold them (INSERT on audit_log, UPDATE on audit_heads); the
 * triggers on users' tables are not SECURITY DEFINER: around the append
 * only, the user id switches to the owner of billing.audit_log (with
 * SECURITY_RESTRICTED_OPERATION) and, around the statements it runs,
 * search_path is pinned to pg_catalog, billing, pg_temp, as PostgreSQL's
 * referential-integrity triggers do.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/cryptohash.h"
#include "common/hashfn.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/execnodes.h"
#include "pgtime.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#ifdef USE_OPENSSL
#include <openssl/evp.h>
#endif

#include "audit_int.h"
#include "billing.h"
#include "catalog.h"
#include "util.h"

static const char *const log_columns[LOG_NCOLS] = {
	"account_id", "seq", "at", "actor", "action", "object", "details",
	"prev_hash", "hash"
};

/* multi-insert batches of audit_log rows */
#define WRITE_BATCH		1000

/* ---------------------------------------------------------------------
 * The relations appends write, and how
 * ---------------------------------------------------------------------
 */

AuditRels	billing_audit_rels;

/* the statements of the SQL paths, prepared once per backend */
static SPIPlanPtr lock_plan = NULL;
static SPIPlanPtr create_plan = NULL;
static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr head_plan = NULL;

static void insert_row_sql(const Datum *values, const char *nulls);
static void write_rows_sql(LogRow **sorted, int n);

/*
 * rels_invalidate
 *		Relcache callback: forget what is known about the audit relations
 *		when one of them changes.
 */
static void
rels_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == billing_audit_rels.log_relid || relid == billing_audit_rels.heads_relid)
		billing_audit_rels.valid = false;
}

/*
 * billing_audit_rels_load
 *		Find the audit relations and decide how rows are written: straight
 *		into the heap and the primary key when billing.audit_log is a plain
 *		table as the extension made it (its nine columns, its primary key as
 *		its only index, no triggers or rules on INSERT, not distributed);
 *		through SQL otherwise.
 */
void
billing_audit_rels_load(void)
{
	static bool registered = false;
	Oid			nsp = get_namespace_oid("billing", false);
	Relation	rel;
	TupleDesc	desc;
	List	   *indexes;
	bool		direct;

	if (billing_audit_rels.valid)
		return;
	if (!registered)
	{
		CacheRegisterRelcacheCallback(rels_invalidate, (Datum) 0);
		registered = true;
	}
	if (billing_audit_rels.cxt == NULL)
		billing_audit_rels.cxt = AllocSetContextCreate(CacheMemoryContext, "billing audit relations",
													   ALLOCSET_SMALL_SIZES);
	MemoryContextReset(billing_audit_rels.cxt);
	billing_audit_rels.index_info = NULL;

	billing_audit_rels.log_relid = get_relname_relid("audit_log", nsp);
	billing_audit_rels.heads_relid = get_relname_relid("audit_heads", nsp);
	if (!OidIsValid(billing_audit_rels.log_relid) || !OidIsValid(billing_audit_rels.heads_relid))
		elog(ERROR, "relations billing.audit_log and billing.audit_heads do not exist");

	rel = table_open(billing_audit_rels.log_relid, AccessShareLock);
	desc = RelationGetDescr(rel);
	billing_audit_rels.owner = rel->rd_rel->relowner;
	billing_audit_rels.natts = desc->natts;

	direct = rel->rd_rel->relkind == RELKIND_RELATION && rel->rd_rules == NULL &&
		(rel->trigdesc == NULL ||
		 !(rel->trigdesc->trig_insert_before_row || rel->trigdesc->trig_insert_after_row ||
		   rel->trigdesc->trig_insert_instead_row ||
		   rel->trigdesc->trig_insert_before_statement ||
		   rel->trigdesc->trig_insert_after_statement));

	/* the nine columns and no other */
	for (int i = 0; i < LOG_NCOLS; i++)
		billing_audit_rels.attnums[i] = InvalidAttrNumber;
	for (int a = 0; a < desc->natts && direct; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);
		int			i;

		if (att->attisdropped)
			continue;
		for (i = 0; i < LOG_NCOLS; i++)
			if (strcmp(NameStr(att->attname), log_columns[i]) == 0)
				break;
		if (i == LOG_NCOLS || att->attgenerated)
			direct = false;
		else
			billing_audit_rels.attnums[i] = att->attnum;
	}
	for (int i = 0; i < LOG_NCOLS && direct; i++)
		if (billing_audit_rels.attnums[i] == InvalidAttrNumber)
			direct = false;

	/* one index, the primary key on plain columns */
	indexes = RelationGetIndexList(rel);
	if (direct && list_length(indexes) == 1 &&
		linitial_oid(indexes) == RelationGetPrimaryKeyIndex(rel))
	{
		Relation	idx = index_open(linitial_oid(indexes), AccessShareLock);
		MemoryContext old = MemoryContextSwitchTo(billing_audit_rels.cxt);
		IndexInfo  *ii = BuildIndexInfo(idx);

		MemoryContextSwitchTo(old);
		if (ii->ii_Expressions != NIL || ii->ii_Predicate != NIL ||
			ii->ii_ExclusionOps != NULL || !idx->rd_index->indimmediate)
			direct = false;
		billing_audit_rels.log_index = RelationGetRelid(idx);
		billing_audit_rels.index_info = ii;
		index_close(idx, AccessShareLock);
	}
	else
		direct = false;
	list_free(indexes);
	table_close(rel, AccessShareLock);

	if (direct && billing_citus_table(billing_audit_rels.log_relid))
		direct = false;
	billing_audit_rels.direct = direct;
	billing_audit_rels.valid = true;
}

/*
 * billing_audit_owner_enter
 *		Act as the owner of billing.audit_log, in a security-restricted
 *		operation; with pin_path, also pin search_path (for statements run
 *		through SPI).  billing_audit_owner_leave undoes it.  An error in between is undone
 *		by the (sub)transaction abort, as for PostgreSQL's RI triggers.
 */
void
billing_audit_owner_enter(OwnerScope *s, bool pin_path)
{
	GetUserIdAndSecContext(&s->save_user, &s->save_sec);
	SetUserIdAndSecContext(billing_audit_rels.owner, s->save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	s->guc_level = -1;
	if (pin_path)
	{
		s->guc_level = NewGUCNestLevel();
		(void) set_config_option("search_path", "pg_catalog, billing, pg_temp",
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
								 true, 0, false);
	}
}

/* back to the caller's user id and settings */
void
billing_audit_owner_leave(OwnerScope *s)
{
	if (s->guc_level >= 0)
		AtEOXact_GUC(true, s->guc_level);
	SetUserIdAndSecContext(s->save_user, s->save_sec);
}

/*
 * billing_audit_prepare_kept
 *		Prepare and keep one of this file's statements.
 */
SPIPlanPtr
billing_audit_prepare_kept(const char *sql, int nargs, Oid *types)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, types);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	SPI_keepplan(plan);
	return plan;
}

/*
 * billing_audit_read_head
 *		Lock a chain's head row and read it (SQL, as the owner with
 *		search_path pinned); creates the row of a new chain.  Under
 *		REPEATABLE READ a concurrent append to the chain raises 40001.
 */
void
billing_audit_read_head(int64 chain, int64 *seq, bool *has_hash, uint8 *hash)
{
	Datum		values[1];
	Oid			types[1] = {INT8OID};
	OwnerScope	scope;
	bool		isnull;
	int			ret;

	billing_audit_owner_enter(&scope, true);
	/*
	 * by the primary key, whatever the statistics say: planned when
	 * audit_heads was small, the kept plan read the whole table for each
	 * chain, and a load of many new accounts took time quadratic in them
	 */
	(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (lock_plan == NULL)
		lock_plan = billing_audit_prepare_kept("SELECT h.seq, h.hash FROM billing.audit_heads h "
											   "WHERE h.account_id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
											   1, types);
	values[0] = Int64GetDatum(chain);
	ret = SPI_execute_plan(lock_plan, values, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not lock audit chain head: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		if (create_plan == NULL)
			create_plan = billing_audit_prepare_kept("INSERT INTO billing.audit_heads (account_id, seq, hash) "
													 "VALUES ($1, 0, NULL) ON CONFLICT (account_id) DO NOTHING",
													 1, types);
		ret = SPI_execute_plan(create_plan, values, NULL, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "could not create audit chain head: %s", SPI_result_code_string(ret));
		ret = SPI_execute_plan(lock_plan, values, NULL, false, 1);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not lock audit chain head: %s", SPI_result_code_string(ret));
		if (SPI_processed == 0)
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("audit chain " INT64_FORMAT " was created by a concurrent transaction",
							chain),
					 errhint("Retry the transaction.")));
	}
	*seq = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	{
		Datum		h = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);

		*has_hash = !isnull;
		if (!isnull)
		{
			bytea	   *b = DatumGetByteaPP(h);

			if (VARSIZE_ANY_EXHDR(b) != PG_SHA256_DIGEST_LENGTH)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("the head of audit chain " INT64_FORMAT " has a hash of %d bytes",
								chain, (int) VARSIZE_ANY_EXHDR(b)),
						 errdetail("A SHA-256 hash has 32 bytes.")));
			memcpy(hash, VARDATA_ANY(b), PG_SHA256_DIGEST_LENGTH);
		}
	}
	SPI_finish();
	billing_audit_owner_leave(&scope);
}

/*
 * billing_audit_append_sql
 *		The append through SQL (Citus, or an audit_log that is not as the
 *		extension made it): lock and read the head, insert the row, write
 *		the head; nothing is kept for the next append.
 */
int64
billing_audit_append_sql(int64 chain, TimestampTz at, const char *actor, const char *action,
						 const char *object, Jsonb *details, const char *json)
{
	int64		seq;
	bool		has_hash;
	uint8		prev[PG_SHA256_DIGEST_LENGTH];
	uint8		hash[PG_SHA256_DIGEST_LENGTH];
	StringInfoData buf;
	Datum		values[LOG_NCOLS];
	char		nulls[LOG_NCOLS];
	OwnerScope	scope;
	int			ret;

	billing_audit_read_head(chain, &seq, &has_hash, prev);
	seq++;
	initStringInfo(&buf);
	if (has_hash)
		appendBinaryStringInfo(&buf, (const char *) prev, sizeof(prev));
	billing_audit_encode_fields(&buf, chain, seq, at, actor, strlen(actor), action, strlen(action),
								object, strlen(object), json);
	billing_audit_sha256(buf.data, buf.len, hash);

	values[LOG_ACCOUNT_ID] = Int64GetDatum(chain);
	values[LOG_SEQ] = Int64GetDatum(seq);
	values[LOG_AT] = TimestampTzGetDatum(at);
	values[LOG_ACTOR] = CStringGetTextDatum(actor);
	values[LOG_ACTION] = CStringGetTextDatum(action);
	values[LOG_OBJECT] = CStringGetTextDatum(object);
	values[LOG_DETAILS] = JsonbPGetDatum(details);
	values[LOG_PREV_HASH] = has_hash ? PointerGetDatum(billing_audit_bytea((const char *) prev, sizeof(prev))) : (Datum) 0;
	values[LOG_HASH] = PointerGetDatum(billing_audit_bytea((const char *) hash, sizeof(hash)));
	memset(nulls, ' ', sizeof(nulls));
	if (!has_hash)
		nulls[LOG_PREV_HASH] = 'n';

	billing_audit_owner_enter(&scope, true);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	insert_row_sql(values, nulls);
	if (head_plan == NULL)
	{
		Oid			htypes[3] = {INT8OID, INT8OID, BYTEAOID};

		head_plan = billing_audit_prepare_kept("UPDATE billing.audit_heads SET seq = $2, hash = $3 "
											   "WHERE account_id OPERATOR(pg_catalog.=) $1",
											   3, htypes);
	}
	values[1] = Int64GetDatum(seq);
	values[2] = values[LOG_HASH];
	ret = SPI_execute_plan(head_plan, values, NULL, false, 0);
	if (ret != SPI_OK_UPDATE || SPI_processed != 1)
		elog(ERROR, "could not write the head of audit chain " INT64_FORMAT ": %s",
			 chain, SPI_result_code_string(ret));
	SPI_finish();
	billing_audit_owner_leave(&scope);
	pfree(buf.data);
	return seq;
}

/*
 * insert_row_sql
 *		INSERT one row into billing.audit_log through SQL (its triggers,
 *		rules and indexes apply); runs with search_path pinned.
 */
static void
insert_row_sql(const Datum *values, const char *nulls)
{
	Oid			types[LOG_NCOLS] = {INT8OID, INT8OID, TIMESTAMPTZOID, TEXTOID, TEXTOID,
	TEXTOID, JSONBOID, BYTEAOID, BYTEAOID};
	int			ret;

	if (insert_plan == NULL)
		insert_plan = billing_audit_prepare_kept("INSERT INTO billing.audit_log (account_id, seq, at, actor, action, "
												 "object, details, prev_hash, hash) "
												 "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
												 LOG_NCOLS, types);
	ret = SPI_execute_plan(insert_plan, (Datum *) values, nulls, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not write an audit row: %s", SPI_result_code_string(ret));
}

/*
 * write_rows_sql
 *		billing_audit_write_rows when billing.audit_log is no longer as the
 *		extension made it: each row through SQL, in chain and seq order.
 */
static void
write_rows_sql(LogRow **sorted, int n)
{
	OwnerScope	scope;

	billing_audit_owner_enter(&scope, true);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	for (int i = 0; i < n; i++)
	{
		LogRow	   *r = sorted[i];
		Datum		values[LOG_NCOLS];
		char		nulls[LOG_NCOLS];

		memset(nulls, ' ', sizeof(nulls));
		values[LOG_ACCOUNT_ID] = Int64GetDatum(r->chain);
		values[LOG_SEQ] = Int64GetDatum(r->seq);
		values[LOG_AT] = TimestampTzGetDatum(r->at);
		values[LOG_ACTOR] = PointerGetDatum(r->actor->txt);
		values[LOG_ACTION] = PointerGetDatum(r->action->txt);
		values[LOG_OBJECT] = PointerGetDatum(r->object->txt);
		values[LOG_DETAILS] = JsonbPGetDatum(r->details);
		values[LOG_PREV_HASH] = r->has_prev ?
			PointerGetDatum(billing_audit_bytea((const char *) r->prev, sizeof(r->prev))) : (Datum) 0;
		if (!r->has_prev)
			nulls[LOG_PREV_HASH] = 'n';
		values[LOG_HASH] = PointerGetDatum(billing_audit_bytea((const char *) r->hash, sizeof(r->hash)));
		insert_row_sql(values, nulls);
	}
	SPI_finish();
	billing_audit_owner_leave(&scope);
}

/*
 * billing_audit_write_rows
 *		Write buffered rows straight into billing.audit_log's heap (one
 *		multi-insert per batch) and primary key, in chain and seq order, as
 *		the executor would, without the executor: the rows satisfy the
 *		table's checks by construction; a duplicate key still raises 23505.
 *		Runs as the extension's owner.
 */
void
billing_audit_write_rows(LogRow **sorted, int n)
{
	Relation	rel;
	Relation	idx;
	TupleDesc	desc;
	IndexInfo  *ii;
	int			nslots = Min(n, WRITE_BATCH);
	TupleTableSlot **slots;
	CommandId	cid;
	MemoryContext batch_cxt;
	MemoryContext old;

	/*
	 * What audit_log is like now, under the lock that keeps it so until the
	 * transaction ends: the rows may have been appended (and buffered)
	 * before an index, trigger, rule or column was added to it, in this
	 * session or in one that committed since.  Then they go in through SQL.
	 */
	rel = table_open(billing_audit_rels.log_relid, RowExclusiveLock);
	billing_audit_rels_load();
	if (!billing_audit_rels.direct)
	{
		table_close(rel, NoLock);
		write_rows_sql(sorted, n);
		return;
	}
	idx = index_open(billing_audit_rels.log_index, RowExclusiveLock);
	desc = RelationGetDescr(rel);
	ii = billing_audit_rels.index_info;
	slots = palloc(nslots * sizeof(TupleTableSlot *));
	cid = GetCurrentCommandId(true);
	batch_cxt = AllocSetContextCreate(CurrentMemoryContext, "billing audit write",
									  ALLOCSET_DEFAULT_SIZES);

	for (int i = 0; i < nslots; i++)
		slots[i] = MakeSingleTupleTableSlot(desc, table_slot_callbacks(rel));

	/* one batch's hashes at a time, in memory reused from batch to batch */
	old = MemoryContextSwitchTo(batch_cxt);
	for (int done = 0; done < n; done += nslots)
	{
		int			k = Min(nslots, n - done);

		MemoryContextReset(batch_cxt);

		for (int j = 0; j < k; j++)
		{
			LogRow	   *r = sorted[done + j];
			TupleTableSlot *slot = slots[j];
			Datum	   *v = slot->tts_values;
			bool	   *isnull = slot->tts_isnull;

			ExecClearTuple(slot);
			for (int a = 0; a < desc->natts; a++)
				isnull[a] = true;
#define SET_FIELD(f, d) (v[billing_audit_rels.attnums[f] - 1] = (d), isnull[billing_audit_rels.attnums[f] - 1] = false)
			SET_FIELD(LOG_ACCOUNT_ID, Int64GetDatum(r->chain));
			SET_FIELD(LOG_SEQ, Int64GetDatum(r->seq));
			SET_FIELD(LOG_AT, TimestampTzGetDatum(r->at));
			SET_FIELD(LOG_ACTOR, PointerGetDatum(r->actor->txt));
			SET_FIELD(LOG_ACTION, PointerGetDatum(r->action->txt));
			SET_FIELD(LOG_OBJECT, PointerGetDatum(r->object->txt));
			SET_FIELD(LOG_DETAILS, JsonbPGetDatum(r->details));
			if (r->has_prev)
				SET_FIELD(LOG_PREV_HASH,
						  PointerGetDatum(billing_audit_bytea((const char *) r->prev, sizeof(r->prev))));
			SET_FIELD(LOG_HASH,
					  PointerGetDatum(billing_audit_bytea((const char *) r->hash, sizeof(r->hash))));
#undef SET_FIELD
			ExecStoreVirtualTuple(slot);
		}
		/* no BulkInsertState: its ring of buffers would make this backend
		 * write out (and flush the WAL of) the pages it just filled */
		table_multi_insert(rel, slots, k, cid, 0, NULL);
		for (int j = 0; j < k; j++)
		{
			Datum		keys[INDEX_MAX_KEYS];
			bool		keynulls[INDEX_MAX_KEYS];

			for (int c = 0; c < ii->ii_NumIndexAttrs; c++)
			{
				AttrNumber	a = ii->ii_IndexAttrNumbers[c];

				keys[c] = slot_getattr(slots[j], a, &keynulls[c]);
			}
			index_insert(idx, keys, keynulls, &slots[j]->tts_tid, rel,
						 UNIQUE_CHECK_YES, false, ii);
		}
	}

	MemoryContextSwitchTo(old);
	MemoryContextDelete(batch_cxt);
	for (int i = 0; i < nslots; i++)
		ExecDropSingleTupleTableSlot(slots[i]);
	pfree(slots);
	index_close(idx, NoLock);
	table_close(rel, NoLock);
}
