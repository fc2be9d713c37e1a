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
 * ISO and IntervalStyle postgres like the extension's own row images.  An
 * UPDATE whose old and new images are equal (jsonb's =) writes nothing.
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
#include "commands/trigger.h"
#include "fmgr.h"
#include "funcapi.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"

#include "audit.h"
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
 * What the row trigger needs about the relation it fires on, set up on its
 * first row of a query (kept in fn_extra, which lives as long as the
 * query).
 */
typedef struct TableAudit
{
	Oid			relid;			/* the relation the trigger fires on */
	char	   *object;			/* the audited table's qualified name */
	AttrNumber	account_att;	/* InvalidAttrNumber: the catalog chain */
	Oid			account_type;
	int			nkeys;			/* primary key columns (0: none) */
	AttrNumber *key_atts;		/* their attributes in this relation */
	TupleDesc	key_desc;		/* the "key" object, blessed */
	TupleDesc	details_desc[3];	/* the details object per operation, blessed */
	FmgrInfo	to_jsonb;		/* to_jsonb(record) */
} TableAudit;

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
 * details_desc
 *		The blessed row type of the details object of one operation: "key"
 *		(with a primary key), then "new" and/or "old" as the relation's row
 *		type.
 */
static TupleDesc
details_desc(TableAudit *ta, Oid rowtype, int op)
{
	int			n = (ta->nkeys > 0) + (op == OP_UPDATE ? 2 : 1);
	TupleDesc	desc = CreateTemplateTupleDesc(n);
	int			a = 0;

	if (ta->nkeys > 0)
		TupleDescInitEntry(desc, ++a, "key", RECORDOID, -1, 0);
	if (op != OP_DELETE)
		TupleDescInitEntry(desc, ++a, "new", rowtype, -1, 0);
	if (op != OP_INSERT)
		TupleDescInitEntry(desc, ++a, "old", rowtype, -1, 0);
	return BlessTupleDesc(desc);
}

/*
 * table_audit
 *		Set up (once per query and relation) what the row trigger needs:
 *		the object name, the account column (trigger argument 1, empty for
 *		the catalog chain; 42703 when it is gone, 42804 when it is no longer
 *		an integer), the primary key columns of the audited table, and
 *		to_jsonb over a record.
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
	FuncExpr   *expr;

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
											RelationGetRelationName(audited));

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

	/* the primary key of the audited table, by column name in this relation */
	pk = RelationGetPrimaryKeyIndex(audited);
	if (OidIsValid(pk))
	{
		Relation	idx = index_open(pk, AccessShareLock);
		int			nkeys = idx->rd_index->indnkeyatts;

		ta->nkeys = nkeys;
		ta->key_atts = palloc(nkeys * sizeof(AttrNumber));
		ta->key_desc = CreateTemplateTupleDesc(nkeys);
		for (int k = 0; k < nkeys; k++)
		{
			char	   *name = get_attname(RelationGetRelid(audited),
										   idx->rd_index->indkey.values[k], false);
			Form_pg_attribute att;

			ta->key_atts[k] = get_attnum(ta->relid, name);
			if (ta->key_atts[k] <= 0)
				elog(ERROR, "primary key column \"%s\" is not a column of \"%s\"",
					 name, RelationGetRelationName(rel));
			att = TupleDescAttr(desc, ta->key_atts[k] - 1);
			TupleDescInitEntry(ta->key_desc, k + 1, name, att->atttypid, att->atttypmod, 0);
		}
		ta->key_desc = BlessTupleDesc(ta->key_desc);
		index_close(idx, AccessShareLock);
	}
	if (audited != rel)
		relation_close(audited, AccessShareLock);

	for (int op = OP_INSERT; op <= OP_DELETE; op++)
		ta->details_desc[op] = details_desc(ta, rel->rd_rel->reltype, op);

	/* to_jsonb(record): it reads its argument's type from the call expression */
	fmgr_info(F_TO_JSONB, &ta->to_jsonb);
	expr = makeFuncExpr(F_TO_JSONB, JSONBOID,
						list_make1(makeNullConst(RECORDOID, -1, InvalidOid)),
						InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL);
	ta->to_jsonb.fn_expr = (Node *) expr;

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
 * row_details
 *		The details object of a change, as jsonb: one to_jsonb over a
 *		record of the key and the row images, so each image is converted
 *		once, straight into the result.
 */
static Jsonb *
row_details(TableAudit *ta, Relation rel, int op, HeapTuple oldtup, HeapTuple newtup)
{
	TupleDesc	desc = RelationGetDescr(rel);
	TupleDesc	ddesc = ta->details_desc[op];
	Datum		values[3];
	bool		nulls[3] = {false, false, false};
	int			a = 0;
	HeapTuple	dtup;
	Datum		result;
	int			pin;

	if (ta->nkeys > 0)
	{
		HeapTuple	src = newtup ? newtup : oldtup;
		Datum	   *kvals = palloc(ta->nkeys * sizeof(Datum));
		bool	   *knulls = palloc(ta->nkeys * sizeof(bool));

		for (int k = 0; k < ta->nkeys; k++)
			kvals[k] = heap_getattr(src, ta->key_atts[k], desc, &knulls[k]);
		values[a++] = HeapTupleGetDatum(heap_form_tuple(ta->key_desc, kvals, knulls));
	}
	if (newtup)
		values[a++] = heap_copy_tuple_as_datum(newtup, desc);
	if (oldtup)
		values[a++] = heap_copy_tuple_as_datum(oldtup, desc);
	Assert(a == ddesc->natts);
	dtup = heap_form_tuple(ddesc, values, nulls);

	pin = rendering_pin();
	result = FunctionCall1(&ta->to_jsonb, HeapTupleGetDatum(dtup));
	rendering_unpin(pin);
	return DatumGetJsonbP(result);
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

	if (audit_suspended())
		return PointerGetDatum(NULL);

	ta = table_audit(fcinfo, td);
	desc = RelationGetDescr(td->tg_relation);
	details = row_details(ta, td->tg_relation, op, oldtup, newtup);
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

	json = JsonbToCString(NULL, &details->root, VARSIZE(details));
	for (int i = 0; i < nchains; i++)
		(void) audit_append(chains[i], op_names[op], ta->object, details, json);
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
	audit_flush();
	return PointerGetDatum(NULL);
}
