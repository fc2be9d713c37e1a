/*
 * audit.c
 *		The C half of the audit log (SPEC section 7): the canonical encoding
 *		of an audit row, its SHA-256 chain hash, the acting role, the test
 *		that tells a dump restore from ordinary changes, and the one
 *		definition of appending a row to a chain, which every writer of
 *		the log uses (billing._audit_append and _audit_append_many for the
 *		extension's own tables, the triggers of audited user tables in
 *		src/audit_table.c).
 *
 * The tables (billing.audit_log, billing.audit_heads), the extension's
 * own audit triggers and billing.verify_audit_log are SQL, in
 * sql/install/70_audit.sql.
 *
 * This file holds the SQL entry points of appending, the acting role and
 * the test for a dump restore;
 * the encoding is in src/audit_encode.c, appending in src/audit_chain.c,
 * the writes in src/audit_write.c (audit_int.h lists them).
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

PG_FUNCTION_INFO_V1(billing_audit_actor);
PG_FUNCTION_INFO_V1(billing_audit_suspended);
PG_FUNCTION_INFO_V1(billing_audit_append);
PG_FUNCTION_INFO_V1(billing_audit_append_deferred);
PG_FUNCTION_INFO_V1(billing_audit_append_many);

/*
 * billing_audit_actor
 *		billing._audit_actor() RETURNS text: the role the client acts as --
 *		the session user, or the role chosen by SET ROLE -- unaffected by
 *		SECURITY DEFINER functions (which change current_user to their
 *		owner).  This is who an audit row names.
 */
Datum
billing_audit_actor(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(GetUserNameFromId(GetOuterUserId(), false)));
}

/*
 * billing_audit_is_suspended
 *		True while a superuser session runs with check_function_bodies off,
 *		which is how pg_dump and pg_restore scripts reload data.  The
 *		reloaded rows come with their audit history (billing.audit_log is
 *		dumped too), so the audit triggers must not log them a second time.
 *		Only a superuser can get here, and a superuser can disable triggers
 *		anyway.
 */
bool
billing_audit_is_suspended(void)
{
	return !check_function_bodies && superuser_arg(GetOuterUserId());
}

/*
 * billing_audit_suspended
 *		billing._audit_suspended() RETURNS boolean:
 *		billing_audit_is_suspended(), for the audit triggers written in SQL.
 */
Datum
billing_audit_suspended(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(billing_audit_is_suspended());
}

/*
 * check_writer
 *		Callers from SQL must be allowed to write the log themselves: the
 *		functions below write it directly, so they check what an INSERT
 *		would (42501 otherwise).
 */
static void
check_writer(void)
{
	billing_audit_rels_load();
	if (pg_class_aclcheck(billing_audit_rels.log_relid, GetUserId(), ACL_INSERT) != ACLCHECK_OK)
		aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_TABLE, "audit_log");
	if (pg_class_aclcheck(billing_audit_rels.heads_relid, GetUserId(), ACL_UPDATE) != ACLCHECK_OK)
		aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_TABLE, "audit_heads");
}

/* the text of a non-null text argument */
static char *
text_arg(FunctionCallInfo fcinfo, int n, const char *name)
{
	if (PG_ARGISNULL(n))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("audit row field \"%s\" must not be null", name)));
	return text_to_cstring(PG_GETARG_TEXT_PP(n));
}

/*
 * chain_is_local
 *		billing._citus_chain_is_local(chain): on Citus, does this node hold
 *		the chain's shard (a trigger on a reference table fires on every
 *		node; only one writes the row)?
 */
static bool
chain_is_local(int64 chain)
{
	Datum		values[1];
	Oid			types[1] = {INT8OID};
	bool		isnull;
	bool		local;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	values[0] = Int64GetDatum(chain);
	if (SPI_execute_with_args("SELECT billing._citus_chain_is_local($1)", 1, types, values,
							  NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not call billing._citus_chain_is_local");
	local = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return !isnull && local;
}

/*
 * append_from_sql
 *		The body of billing._audit_append and _audit_append_deferred: check
 *		the arguments, append the row and, when flush, write it (and the
 *		chain's head) before returning.
 */
static Datum
append_from_sql(FunctionCallInfo fcinfo, bool flush)
{
	int64		chain;
	char	   *action;
	char	   *object;
	Jsonb	   *details;
	int64		seq;

	check_writer();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("audit row field \"%s\" must not be null", "account_id")));
	chain = PG_GETARG_INT64(0);
	action = text_arg(fcinfo, 1, "action");
	object = text_arg(fcinfo, 2, "object");
	if (PG_ARGISNULL(3))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("audit row field \"%s\" must not be null", "details")));
	details = PG_GETARG_JSONB_P(3);
	if (PG_NARGS() > 4 && !PG_ARGISNULL(4) && PG_GETARG_BOOL(4) && !chain_is_local(chain))
		PG_RETURN_NULL();
	seq = billing_audit_chain_append(chain, action, object, details, NULL);
	if (flush)
		billing_audit_chain_flush();
	PG_RETURN_INT64(seq);
}

/*
 * billing_audit_append
 *		billing._audit_append(p_chain, p_action, p_object, p_details,
 *		p_on_placement DEFAULT false) RETURNS bigint: add a row to the chain
 *		of p_chain and bring its head row up to date; returns its seq, or
 *		NULL when p_on_placement and a Citus placement leaves the row to the
 *		node holding the chain.  Under REPEATABLE READ or SERIALIZABLE a
 *		concurrent append to the same chain makes this raise 40001.
 */
Datum
billing_audit_append(PG_FUNCTION_ARGS)
{
	return append_from_sql(fcinfo, true);
}

/*
 * billing_audit_append_deferred
 *		billing._audit_append_deferred(p_chain, p_action, p_object,
 *		p_details) RETURNS bigint: _audit_append for a row trigger whose
 *		table also has the statement trigger billing._audit_statement():
 *		the row is hashed into its chain now and written with the
 *		statement's other rows by that trigger (or by the commit, for a
 *		row trigger deferred to it), as audit_table's triggers do: one
 *		write of the rows and of the heads per statement, not per row.
 *		Where appends go through SQL (Citus) the row is written at once.
 */
Datum
billing_audit_append_deferred(PG_FUNCTION_ARGS)
{
	return append_from_sql(fcinfo, false);
}

/* order of the rows of _audit_append_many: chain, then key */
typedef struct ManyRow
{
	int64		chain;
	int64		key;
	int			i;				/* index in the arrays */
} ManyRow;

/* qsort order of ManyRow: chain, then key, then place in the arrays */
static int
many_row_cmp(const void *a, const void *b)
{
	const ManyRow *x = a;
	const ManyRow *y = b;

	if (x->chain != y->chain)
		return x->chain < y->chain ? -1 : 1;
	if (x->key != y->key)
		return x->key < y->key ? -1 : 1;
	return x->i - y->i;
}

/*
 * billing_audit_append_many
 *		billing._audit_append_many(p_chains, p_keys, p_action, p_objects,
 *		p_details) RETURNS void: _audit_append for many rows at once (one
 *		statement writing adjustments or usage corrections), each chain's in
 *		the order of p_keys (the adjustment or correction ids).  Locks the
 *		chains' heads in account order, appends with one time stamp for the
 *		whole batch and writes each head once.
 */
Datum
billing_audit_append_many(PG_FUNCTION_ARGS)
{
	Datum	   *chains;
	Datum	   *keys;
	Datum	   *objects;
	Datum	   *details;
	bool	   *chain_nulls;
	bool	   *key_nulls;
	bool	   *object_nulls;
	bool	   *detail_nulls;
	char	   *action;
	int			n;
	ManyRow    *rows;
	TimestampTz at;

	check_writer();
	for (int a = 0; a < 5; a++)
		if (PG_ARGISNULL(a))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("_audit_append_many: arguments must not be null")));
	action = text_to_cstring(PG_GETARG_TEXT_PP(2));
	n = billing_array_elems(PG_GETARG_ARRAYTYPE_P(0), INT8OID, 8, true, TYPALIGN_DOUBLE,
							&chains, &chain_nulls, -1, "p_chains", false);
	(void) billing_array_elems(PG_GETARG_ARRAYTYPE_P(1), INT8OID, 8, true, TYPALIGN_DOUBLE,
							   &keys, &key_nulls, n, "p_keys", false);
	(void) billing_array_elems(PG_GETARG_ARRAYTYPE_P(3), TEXTOID, -1, false, TYPALIGN_INT,
							   &objects, &object_nulls, n, "p_objects", false);
	(void) billing_array_elems(PG_GETARG_ARRAYTYPE_P(4), JSONBOID, -1, false, TYPALIGN_INT,
							   &details, &detail_nulls, n, "p_details", false);
	if (n == 0)
		PG_RETURN_VOID();

	rows = palloc(n * sizeof(ManyRow));
	for (int i = 0; i < n; i++)
	{
		rows[i].chain = DatumGetInt64(chains[i]);
		rows[i].key = DatumGetInt64(keys[i]);
		rows[i].i = i;
	}
	qsort(rows, n, sizeof(ManyRow), many_row_cmp);

	/* lock every chain first, in account order (no deadlock between batches) */
	billing_audit_rels_load();
	if (billing_audit_rels.direct)
		for (int i = 0; i < n; i++)
			if (i == 0 || rows[i].chain != rows[i - 1].chain)
				(void) billing_audit_head_get(rows[i].chain);
	at = GetCurrentTimestamp();
	for (int i = 0; i < n; i++)
		(void) billing_audit_append_at(rows[i].chain, action,
									   TextDatumGetCString(objects[rows[i].i]),
									   DatumGetJsonbP(details[rows[i].i]), NULL, at);
	billing_audit_chain_flush();
	PG_RETURN_VOID();
}
