/*
 * ingest_copy.c
 *		COPY FROM into a metered table: counted without firing its
 *		triggers when it keeps no rows, and read faster.
 *
 * billing.meter_table(..., keep_rows => false) puts two triggers on a
 * table: billing_meter_row, BEFORE INSERT FOR EACH ROW, counts each row
 * and drops it; billing_meter_flush, AFTER INSERT FOR EACH STATEMENT,
 * writes the counts.  Through the trigger manager every row COPY parses is
 * formed into a heap tuple for the call and taken apart again by the
 * trigger, which costs about as much as the counting itself.  A
 * ProcessUtility hook therefore runs such a COPY itself when nothing else
 * could happen to its rows: it parses them with COPY's own code (options,
 * formats, defaults, STDIN or a file, the error context with the line) and
 * hands each row's values to the same counting as the row trigger
 * (billing_meter_copy in ingest_trigger.c), then writes the counts as the
 * flush trigger does.  billing's ProcessUtility hook (billing.c) calls it.
 *
 * It does so only when the result is the same as through the triggers,
 * and leaves the statement to PostgreSQL otherwise:
 *   - the table's INSERT triggers are exactly those two, with no WHEN
 *     condition, and both fire under the session's session_replication_role;
 *     any other INSERT trigger (the user's, a foreign key's, an audit
 *     trigger) could see or change the rows;
 *   - an ordinary table, no WHERE clause, no FREEZE option, no row-level
 *     security, Citus not installed (Citus routes COPY itself);
 *   - a transaction that may write (not read-only, not in recovery or
 *     parallel mode), and the checks PostgreSQL makes before a COPY FROM
 *     pass: the rights to read a server file or run a program, and INSERT
 *     on the columns copied.  When one fails, PostgreSQL raises its own
 *     error.
 * A table that keeps its rows and has no event ids has two statement
 * triggers instead: billing_meter_after_rows counts the rows the statement
 * stored, from its transition table, and billing_meter_flush writes the
 * counts.  When those are its only INSERT triggers (and under the other
 * conditions above), the table is not a partition (whose bounds COPY
 * checks) and no column has a volatile default or is generated, the hook
 * stores and counts the rows itself (billing_meter_copy_keep): each row is
 * checked against the table's NOT NULL and CHECK constraints, counted as
 * billing_meter_after_rows counts it, and stored in batches with its index
 * entries (and their unique and exclusion checks), as CopyFrom stores
 * rows; the rows are not written to a transition table and read back.
 * Into any other metered table (with event ids, or other triggers), under
 * the same conditions but the first, the hook runs PostgreSQL's own
 * CopyFrom, as COPY would, with every trigger.  Either way the rows are
 * parsed with the readers of copy_input.c for ISO timestamps and integer
 * quantities, which give exactly what PostgreSQL's input functions give,
 * at a tenth of timestamptz_in's cost.  The command tag is COPY 0 when
 * counted, as through the triggers, which drop every row, and the count of
 * rows stored otherwise.  The hook is installed when the library is
 * loaded (at server start with shared_preload_libraries); before that, in
 * a session that has not used billing yet, COPY goes through the triggers,
 * with the same counts.
 */
#include "postgres.h"

#include "access/table.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_trigger.h"
#include "commands/copy.h"
#include "commands/copyfrom_internal.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "parser/parse_node.h"
#include "parser/parse_relation.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/rel.h"
#include "utils/rls.h"

#include "ingest.h"

/*
 * trigger_fires
 *		Would trigger tg fire in this session?  The rule of the trigger
 *		manager: disabled never, ENABLE REPLICA only under
 *		session_replication_role = replica, ENABLE only under origin or
 *		local, ENABLE ALWAYS always.
 */
static bool
trigger_fires(const Trigger *tg)
{
	if (SessionReplicationRole == SESSION_REPLICATION_ROLE_REPLICA)
		return tg->tgenabled == TRIGGER_FIRES_ON_REPLICA ||
			tg->tgenabled == TRIGGER_FIRES_ALWAYS;
	return tg->tgenabled == TRIGGER_FIRES_ON_ORIGIN ||
		tg->tgenabled == TRIGGER_FIRES_ALWAYS;
}

/*
 * calls
 *		Does trigger tg call the C function fn?
 */
static bool
calls(const Trigger *tg, PGFunction fn)
{
	FmgrInfo	flinfo;

	fmgr_info(tg->tgfoid, &flinfo);
	return flinfo.fn_addr == fn;
}

/*
 * copy_shape
 *		How the hook may run a COPY into rel, from its INSERT triggers, all
 *		of which must fire in this session with no WHEN condition:
 *		COPY_COUNTS when they are exactly the two of a metered table that
 *		keeps no rows (*tg: its row trigger, billing_meter_row);
 *		COPY_KEEPS when they are exactly the two of one that keeps its rows
 *		and has no event ids, so no row trigger (*tg: the statement trigger
 *		that counts the rows stored, billing_meter_after_rows, REFERENCING
 *		NEW TABLE); COPY_OTHER otherwise.
 */
typedef enum CopyShape
{
	COPY_OTHER,
	COPY_COUNTS,
	COPY_KEEPS
} CopyShape;

static CopyShape
copy_shape(Relation rel, Trigger **tg_out)
{
	TriggerDesc *desc = rel->trigdesc;
	Trigger    *row = NULL;
	Trigger    *rows = NULL;
	bool		flush = false;

	*tg_out = NULL;
	if (desc == NULL)
		return COPY_OTHER;
	for (int i = 0; i < desc->numtriggers; i++)
	{
		Trigger    *tg = &desc->triggers[i];
		bool		stmt_after = !TRIGGER_FOR_ROW(tg->tgtype) && TRIGGER_FOR_AFTER(tg->tgtype);

		if (!TRIGGER_FOR_INSERT(tg->tgtype))
			continue;
		if (!trigger_fires(tg) || tg->tgqual != NULL)
			return COPY_OTHER;
		if (row == NULL && TRIGGER_FOR_ROW(tg->tgtype) && TRIGGER_FOR_BEFORE(tg->tgtype) &&
			tg->tgnargs == 7 && strcmp(tg->tgargs[6], "f") == 0 &&
			calls(tg, billing_meter_row))
			row = tg;
		else if (rows == NULL && stmt_after && tg->tgnewtable != NULL && tg->tgoldtable == NULL &&
				 tg->tgnargs == 7 && strcmp(tg->tgargs[4], "") == 0 &&
				 calls(tg, billing_meter_after_rows))
			rows = tg;
		else if (!flush && stmt_after && tg->tgnewtable == NULL && calls(tg, billing_meter_flush))
			flush = true;
		else
			return COPY_OTHER;
	}
	/* the flush trigger and exactly one of the other two */
	if (!flush || (row == NULL) == (rows == NULL))
		return COPY_OTHER;
	*tg_out = row ? row : rows;
	return row ? COPY_COUNTS : COPY_KEEPS;
}

/*
 * metered
 *		Is rel a metered table: has it one of billing's INSERT triggers?
 */
static bool
metered(Relation rel)
{
	TriggerDesc *desc = rel->trigdesc;

	if (desc == NULL)
		return false;
	for (int i = 0; i < desc->numtriggers; i++)
	{
		Trigger    *tg = &desc->triggers[i];

		if (TRIGGER_FOR_INSERT(tg->tgtype) &&
			(calls(tg, billing_meter_row) || calls(tg, billing_meter_after_rows)))
			return true;
	}
	return false;
}

/*
 * may_read_source
 *		Has the user the rights COPY FROM a server file or program needs?
 */
static bool
may_read_source(const CopyStmt *stmt)
{
	if (stmt->filename == NULL)
		return true;			/* STDIN: anybody */
	if (stmt->is_program)
		return has_privs_of_role(GetUserId(), ROLE_PG_EXECUTE_SERVER_PROGRAM);
	return has_privs_of_role(GetUserId(), ROLE_PG_READ_SERVER_FILES);
}

/*
 * may_insert
 *		Would PostgreSQL let this COPY FROM into rel run: INSERT on the
 *		columns copied, no row-level security, a transaction that may write?
 */
static bool
may_insert(ParseState *pstate, Relation rel, const CopyStmt *stmt)
{
	ParseNamespaceItem *nsitem;
	RangeTblEntry *rte;
	List	   *attnums;
	ListCell   *lc;

	if (RecoveryInProgress() || IsInParallelMode() ||
		(XactReadOnly && !rel->rd_islocaltemp))
		return false;
	nsitem = addRangeTableEntryForRelation(pstate, rel, RowExclusiveLock,
										   NULL, false, false);
	rte = nsitem->p_rte;
	rte->requiredPerms = ACL_INSERT;
	attnums = CopyGetAttnums(RelationGetDescr(rel), rel, stmt->attlist);
	foreach(lc, attnums)
		rte->insertedCols = bms_add_member(rte->insertedCols,
										   lfirst_int(lc) - FirstLowInvalidHeapAttributeNumber);
	if (!ExecCheckRTPerms(pstate->p_rtable, false))
		return false;
	return check_enable_rls(RelationGetRelid(rel), InvalidOid, false) != RLS_ENABLED;
}

/*
 * has_option
 *		Is option name among the COPY statement's options?
 */
static bool
has_option(const CopyStmt *stmt, const char *name)
{
	ListCell   *lc;

	foreach(lc, stmt->options)
		if (strcmp(((DefElem *) lfirst(lc))->defname, name) == 0)
			return true;
	return false;
}

/*
 * billing_copy_metered
 *		From billing's ProcessUtility hook (billing.c): run stmt, a COPY
 *		into a metered table, by counting its rows when the table keeps
 *		none and nothing else could happen to them, else by PostgreSQL's
 *		CopyFrom, with the faster readers either way (see the file header).
 *		Returns false, having done nothing the standard COPY would not do,
 *		when PostgreSQL must run it.
 */
bool
billing_copy_metered(CopyStmt *stmt, const char *queryString, QueryEnvironment *queryEnv,
					 QueryCompletion *qc)
{
	Oid			relid;
	Relation	rel;
	Trigger    *tg;
	CopyShape	shape;
	ParseState *pstate;
	CopyFromState cstate;
	uint64		processed;

	if (!stmt->is_from || stmt->relation == NULL || stmt->query != NULL ||
		stmt->whereClause != NULL || has_option(stmt, "freeze") || !may_read_source(stmt))
		return false;

	/*
	 * Citus runs COPY itself, including COPYs into relations that do not
	 * exist (its intermediate results): leave it every COPY.
	 */
	if (OidIsValid(get_extension_oid("citus", true)))
		return false;

	/*
	 * The lock COPY FROM takes, kept to the end of the transaction.  A
	 * relation that does not exist is another hook's or PostgreSQL's error
	 * to raise.
	 */
	relid = RangeVarGetRelid(stmt->relation, RowExclusiveLock, true);
	if (!OidIsValid(relid))
		return false;
	rel = table_open(relid, NoLock);
	if (rel->rd_rel->relkind != RELKIND_RELATION || !metered(rel))
	{
		table_close(rel, NoLock);
		return false;
	}
	pstate = make_parsestate(NULL);
	pstate->p_sourcetext = queryString;
	pstate->p_queryEnv = queryEnv;
	if (!may_insert(pstate, rel, stmt))
	{
		free_parsestate(pstate);
		table_close(rel, NoLock);
		return false;
	}

	cstate = BeginCopyFrom(pstate, rel, NULL, stmt->filename, stmt->is_program,
						   NULL, stmt->attlist, stmt->options);
	billing_copy_fast_inputs(cstate);
	shape = copy_shape(rel, &tg);
	if (shape == COPY_COUNTS)
	{
		billing_meter_copy(rel, tg, cstate);
		processed = 0;			/* no row is stored, as through the triggers */
	}
	else if (shape == COPY_KEEPS && !cstate->volatile_defexprs &&
			 !rel->rd_rel->relispartition &&
			 !(RelationGetDescr(rel)->constr &&
			   RelationGetDescr(rel)->constr->has_generated_stored))
		processed = billing_meter_copy_keep(rel, tg, cstate);
	else
		processed = CopyFrom(cstate);	/* PostgreSQL's COPY, every trigger */
	EndCopyFrom(cstate);
	free_parsestate(pstate);
	table_close(rel, NoLock);
	if (qc)
		SetQueryCompletion(qc, CMDTAG_COPY, processed);
	return true;
}
