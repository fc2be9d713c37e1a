/*
 * audit_table.c
 *		The triggers that billing.audit_table puts on a user's table (SPEC
 *		section 10.4): billing._audit_row, an AFTER ROW trigger that
 *		appends every INSERT, UPDATE and DELETE to the audit chain of the
 *		row's account, and billing._audit_statement, the statement trigger
 *		that writes the chain heads at the end of each statement (AFTER
 *		INSERT OR UPDATE OR DELETE) and refuses TRUNCATE.
 *
 * A row of billing.audit_log for a change of a user's table:
 *
 *		account_id	the value of the account column (of the old row and of
 *					the new one, when an UPDATE changes it: one row in each
 *					chain); 0 without an account column or for a NULL value
 *		action		insert, update or delete
 *		object		the audited table's schema-qualified name (for a
 *					partition: the partitioned table that was audited)
 *		details		{"key": primary key columns, "new": row, "old": row},
 *					"key" only when the table has a primary key (taken from
 *					the new row, or the old one for a DELETE), "new" for
 *					INSERT and UPDATE, "old" for UPDATE and DELETE
 *
 * The row images are to_jsonb of the row as it is, every column (a column
 * added later shows in later rows), rendered with TimeZone UTC, DateStyle
 * ISO and IntervalStyle postgres like the extension's own row images.  The
 * columns of the common types (integers, numeric, boolean, text, dates and
 * times) are converted here, as to_jsonb converts them, from a plan made
 * once per query: to_jsonb itself looks each column's type up again for
 * every row and turns every number into text and back.  Columns of other
 * types go through to_jsonb.  An UPDATE whose old and new images are equal
 * (jsonb's =) writes nothing.
 *
 * The trigger functions are not SECURITY DEFINER: the row images are made
 * with the rights of whoever changes the table; only the append itself
 * runs as the extension's owner (src/audit.c).  Neither depends on the
 * session's search_path.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/relation.h"
#include "access/table.h"
#include "catalog/partition.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"

#include "audit_int.h"
#include "billing.h"

PG_FUNCTION_INFO_V1(billing_audit_row);
PG_FUNCTION_INFO_V1(billing_audit_statement);

enum
{
	OP_INSERT,
	OP_UPDATE,
	OP_DELETE
};

static const char *const op_names[] = {"insert", "update", "delete"};

/*
 * audited_relation
 *		The table billing.audit_table was called on: rel itself, or, when
 *		the trigger is a partition's clone of its parent's, the ancestor
 *		holding the original trigger (returned open, AccessShareLock; the
 *		caller closes it when it is not rel).
 */
static Relation
audited_relation(Relation rel, Trigger *trig)
{
	List	   *ancestors;
	ListCell   *lc;

	if (!trig->tgisclone)
		return rel;
	ancestors = get_partition_ancestors(RelationGetRelid(rel));
	foreach(lc, ancestors)
	{
		Relation	anc = relation_open(lfirst_oid(lc), AccessShareLock);
		TriggerDesc *td = anc->trigdesc;

		for (int i = 0; td != NULL && i < td->numtriggers; i++)
		{
			Trigger    *t = &td->triggers[i];

			if (!t->tgisclone && t->tgfoid == trig->tgfoid &&
				strcmp(t->tgname, trig->tgname) == 0)
				return anc;
		}
		relation_close(anc, AccessShareLock);
	}
	elog(ERROR, "trigger \"%s\" of \"%s\" is a clone, but no ancestor holds it",
		 trig->tgname, RelationGetRelationName(rel));
	return NULL;				/* keep compiler quiet */
}

/*
 * relation_name
 *		The name a row of the relation is audited under: its own, or, for a
 *		Citus shard (a table named <table>_<shard id> that Citus knows as a
 *		shard), the distributed table's, so that the rows written on the
 *		workers name the table as on one node.
 */
static char *
relation_name(Relation rel)
{
	char	   *name = RelationGetRelationName(rel);
	int			len = strlen(name);
	int			i = len;
	Datum		values[1];
	Oid			types[1] = {REGCLASSOID};
	bool		isnull;
	bool		shard;

	while (i > 0 && name[i - 1] >= '0' && name[i - 1] <= '9')
		i--;
	if (i == len || i < 2 || name[i - 1] != '_' ||
		!OidIsValid(get_extension_oid("citus", true)))
		return name;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	values[0] = ObjectIdGetDatum(RelationGetRelid(rel));
	if (SPI_execute_with_args("SELECT pg_catalog.relation_is_a_known_shard($1)",
							  1, types, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not call relation_is_a_known_shard");
	shard = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return (shard && !isnull) ? pnstrdup(name, i - 1) : name;
}

/*
 * col_plan
 *		How the values of one column become jsonb, as to_jsonb does it.
 */
static void
col_plan(ColPlan *c, Form_pg_attribute att)
{
	c->attnum = att->attnum;
	c->key.type = jbvString;
	c->key.val.string.val = pstrdup(NameStr(att->attname));
	c->key.val.string.len = strlen(c->key.val.string.val);
	c->basetype = getBaseType(att->atttypid);
	c->to_jsonb = NULL;
	switch (c->basetype)
	{
		case INT2OID:
			c->kind = COL_INT2;
			break;
		case INT4OID:
			c->kind = COL_INT4;
			break;
		case INT8OID:
			c->kind = COL_INT8;
			break;
		case NUMERICOID:
			c->kind = COL_NUMERIC;
			break;
		case BOOLOID:
			c->kind = COL_BOOL;
			break;
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
			c->kind = COL_TEXT;
			break;
		case DATEOID:
		case TIMESTAMPOID:
		case TIMESTAMPTZOID:
			c->kind = COL_DATETIME;
			break;
		default:
			{
				/* to_jsonb reads its argument's type from the call expression */
				FuncExpr   *expr = makeFuncExpr(F_TO_JSONB, JSONBOID,
												list_make1(makeNullConst(att->atttypid,
																		 att->atttypmod,
																		 att->attcollation)),
												InvalidOid, InvalidOid,
												COERCE_EXPLICIT_CALL);

				c->kind = COL_OTHER;
				c->to_jsonb = palloc0(sizeof(FmgrInfo));
				fmgr_info(F_TO_JSONB, c->to_jsonb);
				c->to_jsonb->fn_expr = (Node *) expr;
			}
			break;
	}
}

/*
 * col_cmp
 *		jsonb's order of object keys (shorter first, then bytewise): the
 *		columns are pushed in this order, so that making the jsonb value
 *		finds them sorted already.
 */
static int
col_cmp(const void *a, const void *b)
{
	const JsonbValue *x = &((const ColPlan *) a)->key;
	const JsonbValue *y = &((const ColPlan *) b)->key;

	if (x->val.string.len != y->val.string.len)
		return x->val.string.len < y->val.string.len ? -1 : 1;
	return memcmp(x->val.string.val, y->val.string.val, x->val.string.len);
}

/* the same order for indexes into TableAudit.cols */
static ColPlan *sort_cols;

/* qsort order of key columns: that of their ColPlans (col_cmp) */
static int
key_col_cmp(const void *a, const void *b)
{
	return col_cmp(&sort_cols[*(const int *) a], &sort_cols[*(const int *) b]);
}

/*
 * table_audit
 *		Set up (once per query and relation) what the row trigger needs:
 *		the object name, the account column (trigger argument 1, empty for
 *		the catalog chain; 42703 when it is gone, 42804 when it is no longer
 *		an integer), how each column becomes jsonb, and the primary key
 *		columns of the audited table.
 */
static TableAudit *
table_audit(FunctionCallInfo fcinfo, TriggerData *td)
{
	Relation	rel = td->tg_relation;
	Trigger    *trig = td->tg_trigger;
	TableAudit *ta = (TableAudit *) fcinfo->flinfo->fn_extra;
	MemoryContext old;
	Relation	audited;
	TupleDesc	desc = RelationGetDescr(rel);
	Oid			pk;

	if (ta != NULL && ta->relid == RelationGetRelid(rel))
		return ta;
	if (trig->tgnargs != 1)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("billing._audit_row() takes one argument, the account column")));

	old = MemoryContextSwitchTo(fcinfo->flinfo->fn_mcxt);
	ta = palloc0(sizeof(TableAudit));
	ta->relid = RelationGetRelid(rel);

	audited = audited_relation(rel, trig);
	ta->object = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(audited)),
											relation_name(audited));

	if (trig->tgargs[0][0] != '\0')
	{
		Form_pg_attribute att;

		ta->account_att = get_attnum(ta->relid, trig->tgargs[0]);
		if (ta->account_att <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("account column \"%s\" of audited table %s does not exist",
							trig->tgargs[0], ta->object),
					 errhint("Audit the table again with billing.audit_table.")));
		att = TupleDescAttr(desc, ta->account_att - 1);
		ta->account_type = att->atttypid;
		if (ta->account_type != INT8OID && ta->account_type != INT4OID &&
			ta->account_type != INT2OID)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("account column \"%s\" of audited table %s has type %s",
							trig->tgargs[0], ta->object, format_type_be(ta->account_type)),
					 errdetail("The account column must be of type bigint, integer or smallint.")));
	}

	/* the columns (not the dropped ones), in jsonb's order of keys */
	ta->cols = palloc(desc->natts * sizeof(ColPlan));
	for (int a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);

		if (att->attisdropped)
			continue;
		col_plan(&ta->cols[ta->ncols], att);
		if (ta->cols[ta->ncols].kind == COL_OTHER)
			ta->has_other = true;
		ta->ncols++;
	}
	qsort(ta->cols, ta->ncols, sizeof(ColPlan), col_cmp);

	/* the primary key of the audited table, by column name in this relation */
	pk = RelationGetPrimaryKeyIndex(audited);
	if (OidIsValid(pk))
	{
		Relation	idx = index_open(pk, AccessShareLock);
		int			nkeys = idx->rd_index->indnkeyatts;

		ta->nkeys = nkeys;
		ta->key_cols = palloc(nkeys * sizeof(int));
		for (int k = 0; k < nkeys; k++)
		{
			char	   *name = get_attname(RelationGetRelid(audited),
										   idx->rd_index->indkey.values[k], false);
			AttrNumber	attnum = get_attnum(ta->relid, name);
			int			i;

			for (i = 0; i < ta->ncols; i++)
				if (ta->cols[i].attnum == attnum)
					break;
			if (i == ta->ncols)
				elog(ERROR, "primary key column \"%s\" is not a column of \"%s\"",
					 name, RelationGetRelationName(rel));
			ta->key_cols[k] = i;
		}
		sort_cols = ta->cols;
		qsort(ta->key_cols, nkeys, sizeof(int), key_col_cmp);
		index_close(idx, AccessShareLock);
	}
	if (audited != rel)
		relation_close(audited, AccessShareLock);

	MemoryContextSwitchTo(old);
	fcinfo->flinfo->fn_extra = ta;
	return ta;
}

/*
 * account_of
 *		The chain of a row: its account column's value, 0 for a NULL value
 *		or without an account column.
 */
static int64
account_of(TableAudit *ta, HeapTuple tup, TupleDesc desc)
{
	Datum		d;
	bool		isnull;

	if (ta->account_att == InvalidAttrNumber)
		return 0;
	d = heap_getattr(tup, ta->account_att, desc, &isnull);
	if (isnull)
		return 0;
	switch (ta->account_type)
	{
		case INT2OID:
			return DatumGetInt16(d);
		case INT4OID:
			return DatumGetInt32(d);
		default:
			return DatumGetInt64(d);
	}
}

/*
 * unchanged
 *		Are the old and new images of an UPDATE's details equal (jsonb's =,
 *		the rule of the extension's own audit triggers)?
 */
static bool
unchanged(Jsonb *details)
{
	JsonbValue	o;
	JsonbValue	n;

	if (!getKeyJsonValueFromContainer(&details->root, "old", 3, &o) ||
		!getKeyJsonValueFromContainer(&details->root, "new", 3, &n) ||
		o.type != jbvBinary || n.type != jbvBinary)
		return false;
	return compareJsonbContainers(o.val.binary.data, n.val.binary.data) == 0;
}

/*
 * billing_audit_row
 *		billing._audit_row(account_column): AFTER INSERT OR UPDATE OR DELETE
 *		FOR EACH ROW trigger of an audited table (and, as clones, of its
 *		partitions).  Appends the change to the chain of the row's account
 *		(both chains, in account order, when an UPDATE moves the row to
 *		another account).  Silent during a pg_dump restore (audit.c).
 */
Datum
billing_audit_row(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TableAudit *ta;
	TupleDesc	desc;
	HeapTuple	oldtup = NULL;
	HeapTuple	newtup = NULL;
	int			op;
	Jsonb	   *details;
	char	   *json;
	int64		chains[2];
	int			nchains = 0;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("billing._audit_row() was not called as a trigger")));
	if (!TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_ROW(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("billing._audit_row() must be fired AFTER, FOR EACH ROW")));
	if (TRIGGER_FIRED_BY_INSERT(td->tg_event))
	{
		op = OP_INSERT;
		newtup = td->tg_trigtuple;
	}
	else if (TRIGGER_FIRED_BY_UPDATE(td->tg_event))
	{
		op = OP_UPDATE;
		oldtup = td->tg_trigtuple;
		newtup = td->tg_newtuple;
	}
	else if (TRIGGER_FIRED_BY_DELETE(td->tg_event))
	{
		op = OP_DELETE;
		oldtup = td->tg_trigtuple;
	}
	else
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("billing._audit_row() must be fired by INSERT, UPDATE or DELETE")));

	if (billing_audit_is_suspended())
		return PointerGetDatum(NULL);

	ta = table_audit(fcinfo, td);
	desc = RelationGetDescr(td->tg_relation);
	details = billing_audit_row_details(ta, td->tg_relation, oldtup, newtup, &json);
	if (op == OP_UPDATE && unchanged(details))
		return PointerGetDatum(NULL);

	if (oldtup)
		chains[nchains++] = account_of(ta, oldtup, desc);
	if (newtup)
	{
		int64		c = account_of(ta, newtup, desc);

		if (nchains == 0 || c != chains[0])
			chains[nchains++] = c;
		if (nchains == 2 && chains[1] < chains[0])
		{
			chains[1] = chains[0];
			chains[0] = c;
		}
	}

	for (int i = 0; i < nchains; i++)
		(void) billing_audit_chain_append(chains[i], op_names[op], ta->object,
										  details, json);
	return PointerGetDatum(NULL);
}

/*
 * billing_audit_statement
 *		billing._audit_statement(): statement trigger of an audited table
 *		and of each of its partitions.  AFTER INSERT OR UPDATE OR DELETE:
 *		writes the chain heads the statement moved.  BEFORE TRUNCATE:
 *		refuses it (55000), since TRUNCATE removes rows without row
 *		triggers.
 */
Datum
billing_audit_statement(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_STATEMENT(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("billing._audit_statement() must be fired FOR EACH STATEMENT")));
	if (TRIGGER_FIRED_BY_TRUNCATE(td->tg_event))
	{
		Relation	rel = td->tg_relation;

		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("truncate of %s is not allowed",
						quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
												   RelationGetRelationName(rel))),
				 errdetail("The table is audited: each change is appended to billing.audit_log by a row trigger, which TRUNCATE does not fire."),
				 errhint("DELETE the rows instead, or stop auditing the table with billing.unaudit_table first.")));
	}
	billing_audit_chain_flush();
	return PointerGetDatum(NULL);
}
