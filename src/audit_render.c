/*
 * audit_render.c
 *		Row images of audited tables' changes (src/audit_table.c): each
 *		column's value converted as to_jsonb converts it, the details
 *		object of a change built in one go, and its text written from the
 *		tree it was built from, as jsonb's output writes the stored value
 *		(the text that is hashed).  Also the settings every row image is
 *		rendered with (TimeZone UTC, DateStyle ISO, IntervalStyle
 *		postgres), for the extension's own audit triggers too.
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
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/float.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"

#include "audit_int.h"
#include "billing.h"

/* ---------------------------------------------------------------------
 * Rendering row images
 * ---------------------------------------------------------------------
 */

/*
 * billing_rendering_pin
 *		Row images are rendered as with TimeZone UTC, DateStyle ISO,
 *		IntervalStyle postgres (as the SQL audit triggers' SET clauses do)
 *		and floats exact (extra_float_digits 1).
 *		When the session's settings render the same already (a zone of
 *		offset 0, ISO dates, postgres intervals: the defaults of a server in
 *		UTC), nothing is changed; else the three are set in a new GUC nest
 *		level, whose number is returned for billing_rendering_unpin.
 */
int
billing_rendering_pin(void)
{
	long		gmtoff;
	int			level;

	if (session_timezone != NULL &&
		pg_get_timezone_offset(session_timezone, &gmtoff) && gmtoff == 0 &&
		DateStyle == USE_ISO_DATES && IntervalStyle == INTSTYLE_POSTGRES &&
		extra_float_digits > 0)
		return -1;
	level = NewGUCNestLevel();
	(void) set_config_option("TimeZone", "UTC", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("DateStyle", "ISO, YMD", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("IntervalStyle", "postgres", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	/* floats exactly (the shortest text that reads back the same value):
	 * a session's extra_float_digits below 1 rounds them, so that two
	 * different values rendered alike and an UPDATE wrote no row */
	(void) set_config_option("extra_float_digits", "1", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	return level;
}

/* give back the settings billing_rendering_pin changed */
void
billing_rendering_unpin(int level)
{
	if (level >= 0)
		AtEOXact_GUC(true, level);
}

/*
 * push_value
 *		Add one column's value to a jsonb object being built, converted as
 *		to_jsonb converts it (numbers as numbers, except NaN and infinities
 *		as strings; dates and times in ISO 8601, timestamptz in UTC).
 */
static void
push_value(JsonbParseState **st, ColPlan *c, Datum v, bool isnull)
{
	static const int utc = 0;
	JsonbValue	jv;

	if (isnull)
		jv.type = jbvNull;
	else
	{
		switch (c->kind)
		{
			case COL_INT2:
				jv.type = jbvNumeric;
				jv.val.numeric = int64_to_numeric(DatumGetInt16(v));
				break;
			case COL_INT4:
				jv.type = jbvNumeric;
				jv.val.numeric = int64_to_numeric(DatumGetInt32(v));
				break;
			case COL_INT8:
				jv.type = jbvNumeric;
				jv.val.numeric = int64_to_numeric(DatumGetInt64(v));
				break;
			case COL_NUMERIC:
				jv.val.numeric = DatumGetNumeric(v);
				if (numeric_is_nan(jv.val.numeric) || numeric_is_inf(jv.val.numeric))
				{
					jv.type = jbvString;
					jv.val.string.val = DatumGetCString(DirectFunctionCall1(numeric_out, v));
					jv.val.string.len = strlen(jv.val.string.val);
				}
				else
					jv.type = jbvNumeric;
				break;
			case COL_BOOL:
				jv.type = jbvBool;
				jv.val.boolean = DatumGetBool(v);
				break;
			case COL_TEXT:
				{
					text	   *t = DatumGetTextPP(v);

					jv.type = jbvString;
					jv.val.string.val = VARDATA_ANY(t);
					jv.val.string.len = VARSIZE_ANY_EXHDR(t);
					if (jv.val.string.len > JENTRY_OFFLENMASK)
						ereport(ERROR,
								(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
								 errmsg("string too long to represent as jsonb string"),
								 errdetail("Due to an implementation restriction, jsonb strings cannot exceed %d bytes.",
										   JENTRY_OFFLENMASK)));
				}
				break;
			case COL_DATETIME:
				jv.type = jbvString;
				jv.val.string.val = JsonEncodeDateTime(NULL, v, c->basetype,
													   c->basetype == TIMESTAMPTZOID ? &utc : NULL);
				jv.val.string.len = strlen(jv.val.string.val);
				break;
			case COL_OTHER:
				{
					Jsonb	   *j = DatumGetJsonbP(FunctionCall1(c->to_jsonb, v));

					jv.type = jbvBinary;
					jv.val.binary.data = &j->root;
					jv.val.binary.len = VARSIZE(j) - VARHDRSZ;
				}
				break;
		}
	}
	pushJsonbValue(st, WJB_VALUE, &jv);
}

/*
 * push_row
 *		Add a row image under key name: an object of every column.
 */
static void
push_row(JsonbParseState **st, TableAudit *ta, const char *name,
		 Datum *values, bool *nulls)
{
	JsonbValue	key;

	key.type = jbvString;
	key.val.string.val = (char *) name;
	key.val.string.len = strlen(name);
	pushJsonbValue(st, WJB_KEY, &key);
	pushJsonbValue(st, WJB_BEGIN_OBJECT, NULL);
	for (int i = 0; i < ta->ncols; i++)
	{
		ColPlan    *c = &ta->cols[i];

		pushJsonbValue(st, WJB_KEY, &c->key);
		push_value(st, c, values[c->attnum - 1], nulls[c->attnum - 1]);
	}
	pushJsonbValue(st, WJB_END_OBJECT, NULL);
}

/*
 * put_json_string
 *		Append s as a JSON string, escaped as PostgreSQL's escape_json does
 *		(\b \f \n \r \t \" \\, other bytes below 0x20 as \u00XX), copying
 *		the runs that need no escape in one go.
 */
static void
put_json_string(StringInfo buf, const char *s, int len)
{
	int			run = 0;

	appendStringInfoCharMacro(buf, '"');
	for (int i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];
		const char *esc;

		if (c >= ' ' && c != '"' && c != '\\')
			continue;
		appendBinaryStringInfo(buf, s + run, i - run);
		run = i + 1;
		switch (c)
		{
			case '\b':
				esc = "\\b";
				break;
			case '\f':
				esc = "\\f";
				break;
			case '\n':
				esc = "\\n";
				break;
			case '\r':
				esc = "\\r";
				break;
			case '\t':
				esc = "\\t";
				break;
			case '"':
				esc = "\\\"";
				break;
			case '\\':
				esc = "\\\\";
				break;
			default:
				appendStringInfo(buf, "\\u%04x", (int) c);
				continue;
		}
		appendStringInfoString(buf, esc);
	}
	appendBinaryStringInfo(buf, s + run, len - run);
	appendStringInfoCharMacro(buf, '"');
}

/*
 * put_json
 *		Append the text of a jsonb value being built (a tree of objects,
 *		arrays and scalars, its object keys sorted and unique, as
 *		pushJsonbValue leaves it), exactly as jsonb's output writes the
 *		value once stored: the text that is hashed.  jsonb's output walks
 *		the stored value with an iterator; this walks the tree it was made
 *		from, which costs a fraction.
 */
static void
put_json(StringInfo buf, JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			appendBinaryStringInfo(buf, "null", 4);
			break;
		case jbvString:
			put_json_string(buf, v->val.string.val, v->val.string.len);
			break;
		case jbvNumeric:
			appendStringInfoString(buf, DatumGetCString(DirectFunctionCall1(numeric_out,
																			NumericGetDatum(v->val.numeric))));
			break;
		case jbvBool:
			if (v->val.boolean)
				appendBinaryStringInfo(buf, "true", 4);
			else
				appendBinaryStringInfo(buf, "false", 5);
			break;
		case jbvArray:
			if (!v->val.array.rawScalar)
				appendStringInfoCharMacro(buf, '[');
			for (int i = 0; i < v->val.array.nElems; i++)
			{
				if (i > 0)
					appendBinaryStringInfo(buf, ", ", 2);
				put_json(buf, &v->val.array.elems[i]);
			}
			if (!v->val.array.rawScalar)
				appendStringInfoCharMacro(buf, ']');
			break;
		case jbvObject:
			appendStringInfoCharMacro(buf, '{');
			for (int i = 0; i < v->val.object.nPairs; i++)
			{
				if (i > 0)
					appendBinaryStringInfo(buf, ", ", 2);
				put_json(buf, &v->val.object.pairs[i].key);
				appendBinaryStringInfo(buf, ": ", 2);
				put_json(buf, &v->val.object.pairs[i].value);
			}
			appendStringInfoCharMacro(buf, '}');
			break;
		default:
			elog(ERROR, "unexpected jsonb value type %d in a row image", (int) v->type);
	}
}

/*
 * billing_audit_row_details
 *		The details object of a change, as jsonb: {"key": the primary key
 *		columns, "new": row, "old": row}, built in one go; and its text
 *		(jsonb's output) into *text.
 */
Jsonb *
billing_audit_row_details(TableAudit *ta, Relation rel, HeapTuple oldtup, HeapTuple newtup, char **text)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Datum	   *ovalues = NULL;
	bool	   *onulls = NULL;
	Datum	   *nvalues = NULL;
	bool	   *nnulls = NULL;
	JsonbParseState *st = NULL;
	JsonbValue *res;
	int			pin = -1;

	if (oldtup)
	{
		ovalues = palloc(desc->natts * sizeof(Datum));
		onulls = palloc(desc->natts * sizeof(bool));
		heap_deform_tuple(oldtup, desc, ovalues, onulls);
	}
	if (newtup)
	{
		nvalues = palloc(desc->natts * sizeof(Datum));
		nnulls = palloc(desc->natts * sizeof(bool));
		heap_deform_tuple(newtup, desc, nvalues, nnulls);
	}
	if (ta->has_other)
		pin = billing_rendering_pin();

	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	if (ta->nkeys > 0)
	{
		Datum	   *kv = newtup ? nvalues : ovalues;
		bool	   *kn = newtup ? nnulls : onulls;
		JsonbValue	key;

		key.type = jbvString;
		key.val.string.val = "key";
		key.val.string.len = 3;
		pushJsonbValue(&st, WJB_KEY, &key);
		pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
		for (int k = 0; k < ta->nkeys; k++)
		{
			ColPlan    *c = &ta->cols[ta->key_cols[k]];

			pushJsonbValue(&st, WJB_KEY, &c->key);
			push_value(&st, c, kv[c->attnum - 1], kn[c->attnum - 1]);
		}
		pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	}
	if (newtup)
		push_row(&st, ta, "new", nvalues, nnulls);
	if (oldtup)
		push_row(&st, ta, "old", ovalues, onulls);
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);

	billing_rendering_unpin(pin);
	{
		StringInfoData buf;
		Jsonb	   *j;

		initStringInfo(&buf);
		put_json(&buf, res);
		j = JsonbValueToJsonb(res);
		/* the text must be what jsonb's output gives for the stored value */
		Assert(strcmp(buf.data, JsonbToCString(NULL, &j->root, VARSIZE(j))) == 0);
		*text = buf.data;
		return j;
	}
}
