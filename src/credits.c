/*
 * credits.c
 *		The drawdown of credits (SPEC 10.2, issue 17): which grant pays how
 *		much of which invoice, and what expires or rolls over after an
 *		invoice.  billing._invoice_build calls it with the lines it built,
 *		for finalize_invoices (on one node and on Citus) and invoice_preview
 *		alike; it reads no table.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

#include "billing.h"
#include "money.h"
#include "price.h"
#include "credits.h"

PG_FUNCTION_INFO_V1(billing_credit_draws);

/* a line of an invoice being built, as the drawdown reads it */
typedef struct DrawLine
{
	int32		idx;			/* its period (1-based place in the arrays) */
	int64		ord;			/* its order on the invoice */
	char	   *kind;
	char	   *meter;			/* NULL: no meter */
	Numeric		unpaid;			/* the positive part of its amount not paid yet */
	Numeric		amount;
} DrawLine;

/* a grant, as the drawdown reads and changes it */
typedef struct DrawGrant
{
	int64		account_id;
	int64		grant_id;		/* negative: a rollover grant created here */
	int32		priority;
	TimestampTz effective_at;
	TimestampTz expires_at;
	bool		expires;		/* false: never expires */
	char	  **applies_to;		/* NULL: every line it may pay */
	int			n_applies;
	char	   *source;
	Numeric		remaining;
	Numeric		rollover_fraction;
	TimestampTz next_starts;
	TimestampTz next_ends;
	bool		has_next;		/* a next window of its commitment */
	text	   *reason;
	bool		has_last_end;	/* the account's subscriptions all end */
	TimestampTz last_end;		/* at the end of its last billing period */
} DrawGrant;

/* a period of one account, in time order */
typedef struct DrawPeriod
{
	int32		idx;
	int64		account_id;
	TimestampTz starts;
	TimestampTz ends;
} DrawPeriod;

/* the output: rows of billing._invoice_line */
typedef struct DrawOut
{
	Tuplestorestate *store;
	TupleDesc	desc;
	int			natts;
	int			a_idx, a_ord, a_kind, a_description, a_amount, a_grant_id,
				a_effective_at, a_expires_at, a_source_grant;
} DrawOut;

/*
 * billing_attnum_of: the 0-based place of a column of a row type; ERROR when the
 * type has no such column (a mismatch between the SQL and C halves).
 */
int
billing_attnum_of(TupleDesc desc, const char *name)
{
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute a = TupleDescAttr(desc, i);

		if (!a->attisdropped && strcmp(NameStr(a->attname), name) == 0)
			return i;
	}
	elog(ERROR, "row type %s has no column \"%s\"",
		 format_type_be(desc->tdtypeid), name);
	return -1;					/* keep the compiler quiet */
}

/*
 * billing_rows_of: the elements of an array of a row type, each deformed into
 * values and nulls (palloc'd arrays of the row type's width); returns the
 * number of elements and sets *desc to the row type's descriptor (the
 * caller releases it).  NULL elements are skipped.
 */
int
billing_rows_of(ArrayType *arr, TupleDesc *desc, Datum ***values, bool ***nulls)
{
	Oid			elemtype = ARR_ELEMTYPE(arr);
	int16		typlen;
	bool		typbyval;
	char		typalign;
	Datum	   *elems;
	bool	   *elemnulls;
	int			n,
				k = 0;

	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	deconstruct_array(arr, elemtype, typlen, typbyval, typalign, &elems, &elemnulls, &n);
	*desc = lookup_rowtype_tupdesc(elemtype, -1);
	*values = palloc(sizeof(Datum *) * Max(n, 1));
	*nulls = palloc(sizeof(bool *) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		HeapTupleHeader th;
		HeapTupleData tuple;

		if (elemnulls[i])
			continue;
		th = DatumGetHeapTupleHeader(elems[i]);
		tuple.t_len = HeapTupleHeaderGetDatumLength(th);
		ItemPointerSetInvalid(&tuple.t_self);
		tuple.t_tableOid = InvalidOid;
		tuple.t_data = th;
		(*values)[k] = palloc(sizeof(Datum) * (*desc)->natts);
		(*nulls)[k] = palloc(sizeof(bool) * (*desc)->natts);
		heap_deform_tuple(&tuple, *desc, (*values)[k], (*nulls)[k]);
		k++;
	}
	return k;
}

/* numeric 0 */
static Numeric
num_zero(void)
{
	return int64_to_numeric(0);
}

/* numeric_cmp of a and b: below, equal to or above 0 (credits.h) */
int
billing_num_cmp(Numeric a, Numeric b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a),
											 NumericGetDatum(b)));
}

/* the smaller of a and b */
static Numeric
num_min(Numeric a, Numeric b)
{
	return billing_num_cmp(a, b) <= 0 ? a : b;
}

/*
 * grant_cmp: the total drawdown order: priority ascending, grants with
 * applies_to first, expires_at ascending (never last), effective_at, then
 * grant_id, a rollover grant created here (negative id) after every
 * existing grant, as its id will be, and in the order it was created.
 */
static int
grant_cmp(const void *a, const void *b)
{
	const DrawGrant *x = *(DrawGrant *const *) a;
	const DrawGrant *y = *(DrawGrant *const *) b;

	if (x->priority != y->priority)
		return x->priority < y->priority ? -1 : 1;
	if ((x->applies_to == NULL) != (y->applies_to == NULL))
		return x->applies_to == NULL ? 1 : -1;
	if (x->expires != y->expires)
		return x->expires ? -1 : 1;
	if (x->expires && x->expires_at != y->expires_at)
		return x->expires_at < y->expires_at ? -1 : 1;
	if (x->effective_at != y->effective_at)
		return x->effective_at < y->effective_at ? -1 : 1;
	if ((x->grant_id < 0) != (y->grant_id < 0))
		return x->grant_id < 0 ? 1 : -1;
	if (x->grant_id < 0)
		return x->grant_id > y->grant_id ? -1 : (x->grant_id < y->grant_id ? 1 : 0);
	return x->grant_id < y->grant_id ? -1 : (x->grant_id > y->grant_id ? 1 : 0);
}

/* periods by account, then time */
static int
period_cmp(const void *a, const void *b)
{
	const DrawPeriod *x = (const DrawPeriod *) a;
	const DrawPeriod *y = (const DrawPeriod *) b;

	if (x->account_id != y->account_id)
		return x->account_id < y->account_id ? -1 : 1;
	if (x->starts != y->starts)
		return x->starts < y->starts ? -1 : 1;
	return x->idx - y->idx;
}

/* grants by account */
static int
grant_account_cmp(const void *a, const void *b)
{
	const DrawGrant *x = *(DrawGrant *const *) a;
	const DrawGrant *y = *(DrawGrant *const *) b;

	if (x->account_id != y->account_id)
		return x->account_id < y->account_id ? -1 : 1;
	return 0;
}

/* qsort order of lines: period, then place on the invoice */
static int
line_cmp(const void *a, const void *b)
{
	const DrawLine *x = (const DrawLine *) a;
	const DrawLine *y = (const DrawLine *) b;

	if (x->idx != y->idx)
		return x->idx < y->idx ? -1 : 1;
	return x->ord < y->ord ? -1 : (x->ord > y->ord ? 1 : 0);
}

/*
 * grant_pays: does a grant pay a line of this kind and meter?  applies_to
 * NULL: usage, fixed, true_up and adjustment lines; a list of meters: the
 * usage and adjustment lines of those meters; never commitment, cap or
 * credit lines.
 */
static bool
grant_pays(const DrawGrant *g, const DrawLine *l)
{
	if (g->applies_to == NULL)
		return strcmp(l->kind, "usage") == 0 || strcmp(l->kind, "fixed") == 0 ||
			strcmp(l->kind, "true_up") == 0 || strcmp(l->kind, "adjustment") == 0;
	if (strcmp(l->kind, "usage") != 0 && strcmp(l->kind, "adjustment") != 0)
		return false;
	if (l->meter == NULL)
		return false;
	for (int i = 0; i < g->n_applies; i++)
		if (strcmp(g->applies_to[i], l->meter) == 0)
			return true;
	return false;
}

/* put one output row: a credit line or a ledger entry of the drawdown */
static void
emit(DrawOut *out, int32 idx, int64 ord, const char *kind, text *description,
	 Numeric amount, int64 grant_id, TimestampTz effective_at,
	 bool has_expires, TimestampTz expires_at, bool has_source, int64 source_grant)
{
	Datum	   *values = palloc0(sizeof(Datum) * out->natts);
	bool	   *nulls = palloc(sizeof(bool) * out->natts);

	memset(nulls, true, sizeof(bool) * out->natts);
	values[out->a_idx] = Int32GetDatum(idx);
	nulls[out->a_idx] = false;
	values[out->a_ord] = Int64GetDatum(ord);
	nulls[out->a_ord] = false;
	values[out->a_kind] = CStringGetTextDatum(kind);
	nulls[out->a_kind] = false;
	if (description)
	{
		values[out->a_description] = PointerGetDatum(description);
		nulls[out->a_description] = false;
	}
	values[out->a_amount] = NumericGetDatum(amount);
	nulls[out->a_amount] = false;
	values[out->a_grant_id] = Int64GetDatum(grant_id);
	nulls[out->a_grant_id] = false;
	values[out->a_effective_at] = TimestampTzGetDatum(effective_at);
	nulls[out->a_effective_at] = false;
	if (has_expires)
	{
		values[out->a_expires_at] = TimestampTzGetDatum(expires_at);
		nulls[out->a_expires_at] = false;
	}
	if (has_source)
	{
		values[out->a_source_grant] = Int64GetDatum(source_grant);
		nulls[out->a_source_grant] = false;
	}
	tuplestore_putvalues(out->store, out->desc, values, nulls);
}

/*
 * draw_account: the drawdown of one account's periods (in time order) from
 * its grants.  For each period: the grants overlapping it, in the total
 * order, each paying the positive part of the lines it applies to that
 * earlier grants left unpaid, in line order (a usage line after the cap:
 * scaled down in the proportion the cap cut the period's usage), at most
 * what it has left and never more than what the lines credits may pay add
 * up to (never commitment lines; negative lines lower it); each grant's draw
 * rounded once to the minor unit (exact: lines are rounded) is a 'credit'
 * row (negative).  With book, after the period's draws, each grant expired
 * by the period's end with something left (or expiring after the account's
 * last period, whose subscriptions all end, when this is it): round(f *
 * left) of a commitment
 * grant with a next window rolls over ('rollover' on it, 'grant' of a new
 * grant -1, -2, ... for the next window, which later periods draw from),
 * the rest is booked 'expire'.
 */
static void
draw_account(DrawOut *out, DrawPeriod *periods, int n_periods, DrawLine *lines,
			 const int *line_first, const int *line_last, DrawGrant **grants,
			 int n_grants, int max_grants, int exponent, bool book)
{
	int64		n_out = 0;
	int			placeholders = 0;
	Numeric		zero = num_zero();

	qsort(grants, n_grants, sizeof(DrawGrant *), grant_cmp);
	for (int p = 0; p < n_periods; p++)
	{
		DrawPeriod *per = &periods[p];
		int			first = line_first[per->idx],
					last = line_last[per->idx];
		Numeric		owed = zero;
		bool		created = false;

		/*
		 * this period's lines: first .. last (sorted by period, then
		 * order).  What credits may pay: the lines some grant may pay
		 * (never commitment lines), the usage lines after the cap: each
		 * scaled down in the proportion the cap cut the period's usage, as
		 * a minimum's eligible spend counts them (_eligible_spend)
		 */
		if (first >= 0)
		{
			Numeric		usage = zero;
			Numeric		capped = zero;
			bool		scale;

			for (int j = first; j <= last; j++)
			{
				if (strcmp(lines[j].kind, "usage") == 0)
					usage = numeric_add_opt_error(usage, lines[j].amount, NULL);
				else if (strcmp(lines[j].kind, "cap") == 0)
					capped = numeric_add_opt_error(capped, lines[j].amount, NULL);
			}
			scale = billing_num_cmp(capped, zero) != 0 && billing_num_cmp(usage, zero) > 0;
			if (scale)
			{
				capped = numeric_add_opt_error(usage, capped, NULL);
				if (billing_num_cmp(capped, zero) < 0)
					capped = zero;
			}
			for (int j = first; j <= last; j++)
			{
				DrawLine   *l = &lines[j];

				if (strcmp(l->kind, "usage") == 0 && scale)
				{
					/* amount * capped / usage: exact where it divides */
					Numeric		a = numeric_div_opt_error(numeric_mul_opt_error(l->amount, capped, NULL),
														  usage, NULL);

					l->unpaid = billing_num_cmp(a, zero) > 0 ? a : zero;
				}
				else if (strcmp(l->kind, "usage") == 0 || strcmp(l->kind, "fixed") == 0 ||
						 strcmp(l->kind, "true_up") == 0 || strcmp(l->kind, "adjustment") == 0)
					owed = numeric_add_opt_error(owed, l->amount, NULL);
			}
			/*
			 * the usage after the cap counts whole, not as the sum of its
			 * scaled lines: a division that does not come out exact (1.00
			 * over three lines) would leave the bound a hair under a cent
			 * and a draw rounded to the cent above it
			 */
			if (scale)
				owed = numeric_add_opt_error(owed, capped, NULL);
		}
		for (int x = 0; x < n_grants && first >= 0; x++)
		{
			DrawGrant  *g = grants[x];
			Numeric		d = zero;
			Numeric		cap;

			if (billing_num_cmp(owed, zero) <= 0)
				break;
			if (billing_num_cmp(g->remaining, zero) <= 0 || g->effective_at >= per->ends ||
				(g->expires && g->expires_at <= per->starts))
				continue;
			cap = num_min(g->remaining, owed);
			for (int j = first; j <= last; j++)
			{
				DrawLine   *l = &lines[j];
				Numeric		pay;

				if (billing_num_cmp(d, cap) >= 0)
					break;
				if (billing_num_cmp(l->unpaid, zero) <= 0 || !grant_pays(g, l))
					continue;
				pay = num_min(l->unpaid, numeric_sub_opt_error(cap, d, NULL));
				l->unpaid = numeric_sub_opt_error(l->unpaid, pay, NULL);
				d = numeric_add_opt_error(d, pay, NULL);
			}
			d = num_min(num_min(billing_round_money(d, exponent), g->remaining), owed);
			if (billing_num_cmp(d, zero) > 0)
			{
				g->remaining = numeric_sub_opt_error(g->remaining, d, NULL);
				owed = numeric_sub_opt_error(owed, d, NULL);
				emit(out, per->idx, INT64CONST(5000000000) + ++n_out, "credit", g->reason,
					 DatumGetNumeric(DirectFunctionCall1(numeric_uminus, NumericGetDatum(d))),
					 g->grant_id, per->ends, false, 0, false, 0);
			}
		}
		if (!book)
			continue;
		for (int x = 0, n = n_grants; x < n; x++)
		{
			DrawGrant  *g = grants[x];
			Numeric		roll = zero;
			Numeric		rest;

			bool		last;

			if (billing_num_cmp(g->remaining, zero) <= 0 || !g->expires)
				continue;
			/*
			 * the account's last period overlapping the grant's window: the
			 * one its expiry falls in, or the last of the account when its
			 * subscriptions end before the expiry (nothing rolls over then:
			 * there is no next period to draw from it)
			 */
			last = g->has_last_end && per->ends >= g->last_end && g->effective_at < per->ends;
			if (g->expires_at > per->ends && !last)
				continue;
			if (!last &&
				strcmp(g->source, "commitment") == 0 && g->has_next &&
				billing_num_cmp(g->rollover_fraction, zero) > 0)
				roll = num_min(billing_round_money(numeric_mul_opt_error(g->rollover_fraction,
																		 g->remaining, NULL),
												   exponent),
							   g->remaining);
			if (billing_num_cmp(roll, zero) > 0 && n_grants < max_grants)
			{
				DrawGrant  *r = palloc0(sizeof(DrawGrant));
				char		buf[64];

				placeholders++;
				snprintf(buf, sizeof(buf), "rollover of grant " INT64_FORMAT, g->grant_id);
				*r = *g;
				r->grant_id = -placeholders;
				r->effective_at = g->next_starts;
				r->expires_at = g->next_ends;
				r->expires = true;
				r->source = "rollover";
				r->remaining = roll;
				r->rollover_fraction = zero;
				r->has_next = false;
				r->reason = cstring_to_text(buf);
				emit(out, per->idx, INT64CONST(6000000000) + ++n_out, "rollover", g->reason,
					 DatumGetNumeric(DirectFunctionCall1(numeric_uminus, NumericGetDatum(roll))),
					 g->grant_id, g->expires_at, false, 0, false, 0);
				emit(out, per->idx, INT64CONST(6000000000) + ++n_out, "grant", r->reason, roll,
					 r->grant_id, r->effective_at, true, r->expires_at, true, g->grant_id);
				grants[n_grants++] = r;
				created = true;
			}
			rest = numeric_sub_opt_error(g->remaining, roll, NULL);
			if (billing_num_cmp(rest, zero) > 0)
				emit(out, per->idx, INT64CONST(6000000000) + ++n_out, "expire", g->reason,
					 DatumGetNumeric(DirectFunctionCall1(numeric_uminus, NumericGetDatum(rest))),
					 g->grant_id, g->expires_at, false, 0, false, 0);
			g->remaining = zero;
		}
		if (created)
			qsort(grants, n_grants, sizeof(DrawGrant *), grant_cmp);
	}
}

/*
 * _credit_draws(accounts bigint[], currencies text[], starts timestamptz[],
 *               ends timestamptz[], book boolean, lines _invoice_line[],
 *               grants _credit_state[]) -> SETOF _invoice_line
 *
 * Period i is (accounts[i], starts[i], ends[i]); lines name their period by
 * idx.  Each account's periods are drawn in time order from its grants
 * (draw_account); the rows are the 'credit' lines (ord 5e9 + n) and, with
 * book, the 'expire', 'rollover' and 'grant' entries (ord 6e9 + n), n
 * counting each account's rows.
 */
Datum
billing_credit_draws(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ArrayType  *a_accounts,
			   *a_currencies,
			   *a_starts,
			   *a_ends,
			   *a_lines,
			   *a_grants;
	bool		book;
	Datum	   *accounts,
			   *currencies,
			   *starts,
			   *ends;
	bool	   *nulls;
	int			n_periods,
				n;
	TupleDesc	ldesc,
				gdesc;
	Datum	  **lvals,
			  **gvals;
	bool	  **lnulls,
			  **gnulls;
	int			n_lines,
				n_grants;
	DrawLine   *lines;
	DrawGrant  *grants;
	DrawOut		out;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < 7; i++)
		if (PG_ARGISNULL(i))
			PG_RETURN_NULL();
	a_accounts = PG_GETARG_ARRAYTYPE_P(0);
	a_currencies = PG_GETARG_ARRAYTYPE_P(1);
	a_starts = PG_GETARG_ARRAYTYPE_P(2);
	a_ends = PG_GETARG_ARRAYTYPE_P(3);
	book = PG_GETARG_BOOL(4);
	a_lines = PG_GETARG_ARRAYTYPE_P(5);
	a_grants = PG_GETARG_ARRAYTYPE_P(6);

	deconstruct_array(a_accounts, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &accounts, &nulls, &n_periods);
	deconstruct_array(a_currencies, TEXTOID, -1, false, TYPALIGN_INT, &currencies, &nulls, &n);
	if (n != n_periods)
		elog(ERROR, "_credit_draws: arrays of different lengths");
	deconstruct_array(a_starts, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &starts, &nulls, &n);
	if (n != n_periods)
		elog(ERROR, "_credit_draws: arrays of different lengths");
	deconstruct_array(a_ends, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &ends, &nulls, &n);
	if (n != n_periods)
		elog(ERROR, "_credit_draws: arrays of different lengths");

	/* the output row type is the lines' */
	out.store = rsinfo->setResult;
	out.desc = rsinfo->setDesc;
	out.natts = out.desc->natts;
	out.a_idx = billing_attnum_of(out.desc, "idx");
	out.a_ord = billing_attnum_of(out.desc, "ord");
	out.a_kind = billing_attnum_of(out.desc, "kind");
	out.a_description = billing_attnum_of(out.desc, "description");
	out.a_amount = billing_attnum_of(out.desc, "amount");
	out.a_grant_id = billing_attnum_of(out.desc, "grant_id");
	out.a_effective_at = billing_attnum_of(out.desc, "effective_at");
	out.a_expires_at = billing_attnum_of(out.desc, "expires_at");
	out.a_source_grant = billing_attnum_of(out.desc, "source_grant");

	/* the lines, sorted by period and order */
	n_lines = billing_rows_of(a_lines, &ldesc, &lvals, &lnulls);
	lines = palloc0(sizeof(DrawLine) * Max(n_lines, 1));
	{
		int			c_idx = billing_attnum_of(ldesc, "idx"),
					c_ord = billing_attnum_of(ldesc, "ord"),
					c_kind = billing_attnum_of(ldesc, "kind"),
					c_meter = billing_attnum_of(ldesc, "meter"),
					c_amount = billing_attnum_of(ldesc, "amount");

		for (int j = 0; j < n_lines; j++)
		{
			Numeric		amount;

			if (lnulls[j][c_idx] || lnulls[j][c_ord] || lnulls[j][c_kind] || lnulls[j][c_amount])
				elog(ERROR, "_credit_draws: a line without idx, ord, kind or amount");
			amount = DatumGetNumeric(lvals[j][c_amount]);
			lines[j].idx = DatumGetInt32(lvals[j][c_idx]);
			lines[j].ord = DatumGetInt64(lvals[j][c_ord]);
			lines[j].kind = TextDatumGetCString(lvals[j][c_kind]);
			lines[j].meter = lnulls[j][c_meter] ? NULL : TextDatumGetCString(lvals[j][c_meter]);
			lines[j].amount = amount;
			lines[j].unpaid = billing_num_cmp(amount, num_zero()) > 0 ? amount : num_zero();
		}
	}
	ReleaseTupleDesc(ldesc);
	qsort(lines, n_lines, sizeof(DrawLine), line_cmp);

	/* the grants */
	n_grants = billing_rows_of(a_grants, &gdesc, &gvals, &gnulls);
	grants = palloc0(sizeof(DrawGrant) * Max(n_grants, 1));
	{
		int			c_account = billing_attnum_of(gdesc, "account_id"),
					c_grant = billing_attnum_of(gdesc, "grant_id"),
					c_priority = billing_attnum_of(gdesc, "priority"),
					c_effective = billing_attnum_of(gdesc, "effective_at"),
					c_expires = billing_attnum_of(gdesc, "expires_at"),
					c_applies = billing_attnum_of(gdesc, "applies_to"),
					c_source = billing_attnum_of(gdesc, "source"),
					c_remaining = billing_attnum_of(gdesc, "remaining"),
					c_fraction = billing_attnum_of(gdesc, "rollover_fraction"),
					c_next_starts = billing_attnum_of(gdesc, "next_starts"),
					c_next_ends = billing_attnum_of(gdesc, "next_ends"),
					c_reason = billing_attnum_of(gdesc, "reason"),
					c_last_end = billing_attnum_of(gdesc, "last_end");

		for (int k = 0; k < n_grants; k++)
		{
			Datum	   *v = gvals[k];
			bool	   *z = gnulls[k];
			DrawGrant  *g = &grants[k];

			if (z[c_account] || z[c_grant] || z[c_priority] || z[c_effective] ||
				z[c_source] || z[c_remaining])
				elog(ERROR, "_credit_draws: a grant without account, id, priority, start, source or remaining amount");
			g->account_id = DatumGetInt64(v[c_account]);
			g->grant_id = DatumGetInt64(v[c_grant]);
			g->priority = DatumGetInt32(v[c_priority]);
			g->effective_at = DatumGetTimestampTz(v[c_effective]);
			g->expires = !z[c_expires];
			g->expires_at = g->expires ? DatumGetTimestampTz(v[c_expires]) : 0;
			if (!z[c_applies])
			{
				Datum	   *m;
				bool	   *mn;
				int			nm;

				deconstruct_array(DatumGetArrayTypeP(v[c_applies]), TEXTOID, -1, false,
								  TYPALIGN_INT, &m, &mn, &nm);
				g->applies_to = palloc(sizeof(char *) * Max(nm, 1));
				for (int i = 0; i < nm; i++)
					if (!mn[i])
						g->applies_to[g->n_applies++] = TextDatumGetCString(m[i]);
			}
			g->source = TextDatumGetCString(v[c_source]);
			g->remaining = DatumGetNumeric(v[c_remaining]);
			g->rollover_fraction = z[c_fraction] ? num_zero() : DatumGetNumeric(v[c_fraction]);
			g->has_next = !z[c_next_starts] && !z[c_next_ends];
			g->next_starts = g->has_next ? DatumGetTimestampTz(v[c_next_starts]) : 0;
			g->next_ends = g->has_next ? DatumGetTimestampTz(v[c_next_ends]) : 0;
			g->reason = z[c_reason] ? NULL : DatumGetTextPP(v[c_reason]);
			g->has_last_end = !z[c_last_end];
			g->last_end = g->has_last_end ? DatumGetTimestampTz(v[c_last_end]) : 0;
		}
	}
	ReleaseTupleDesc(gdesc);

	/* each period's lines: line_first[idx] .. line_last[idx] (-1: none) */
	{
		int		   *line_first = palloc(sizeof(int) * (n_periods + 2));
		int		   *line_last = palloc(sizeof(int) * (n_periods + 2));
		DrawPeriod *periods = palloc(sizeof(DrawPeriod) * Max(n_periods, 1));
		DrawGrant **byacc = palloc(sizeof(DrawGrant *) * Max(n_grants, 1));
		int			p = 0,
					g = 0;

		for (int k = 0; k <= n_periods + 1; k++)
			line_first[k] = line_last[k] = -1;
		for (int j = 0; j < n_lines; j++)
		{
			int			idx = lines[j].idx;

			if (idx < 1 || idx > n_periods)
				elog(ERROR, "_credit_draws: a line of period %d, of %d", idx, n_periods);
			if (line_first[idx] < 0)
				line_first[idx] = j;
			line_last[idx] = j;
		}
		/* periods by account and time, grants by account: walk both */
		for (int k = 0; k < n_periods; k++)
		{
			periods[k].idx = k + 1;
			periods[k].account_id = DatumGetInt64(accounts[k]);
			periods[k].starts = DatumGetTimestampTz(starts[k]);
			periods[k].ends = DatumGetTimestampTz(ends[k]);
		}
		qsort(periods, n_periods, sizeof(DrawPeriod), period_cmp);
		for (int k = 0; k < n_grants; k++)
			byacc[k] = &grants[k];
		qsort(byacc, n_grants, sizeof(DrawGrant *), grant_account_cmp);
		while (p < n_periods)
		{
			int64		acc = periods[p].account_id;
			int			p_end = p,
						g_start,
						ng,
						np;
			char	   *currency;
			int			exponent;
			DrawGrant **mine;

			while (p_end < n_periods && periods[p_end].account_id == acc)
				p_end++;
			while (g < n_grants && byacc[g]->account_id < acc)
				g++;
			g_start = g;
			while (g < n_grants && byacc[g]->account_id == acc)
				g++;
			ng = g - g_start;
			np = p_end - p;
			if (ng > 0)
			{
				currency = TextDatumGetCString(currencies[periods[p].idx - 1]);
				exponent = billing_currency_exponent(currency);
				if (exponent < 0)
					ereport(ERROR,
							(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							 errmsg("unknown currency \"%s\"", currency)));
				/* room for a rollover grant per grant and period */
				mine = palloc(sizeof(DrawGrant *) * (ng + (size_t) ng * np + 1));
				memcpy(mine, &byacc[g_start], sizeof(DrawGrant *) * ng);
				draw_account(&out, &periods[p], np, lines, line_first, line_last, mine, ng,
							 ng + ng * np + 1, exponent, book);
			}
			p = p_end;
		}
	}
	return (Datum) 0;
}
