/*
 * segments.c
 *		Plans in segments and the spend cap (SPEC 10.2): the lines of
 *		periods rated segment by segment as the invoice shows them
 *		(billing._segment_lines: each line names its segment, fixed fees
 *		prorated), and the one definition of the spend cap line
 *		(billing._cap_amount).  Like the drawdown in credits.c, whose row
 *		helpers it shares (credits.h), it reads no table.
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

/*
 * cap_amount: the spend cap line of a period whose usage lines add up to
 * usage: what takes them down to the cap rounded to the minor unit, when
 * they exceed it; NULL (returns false) when they do not.
 */
static bool
cap_amount(Numeric cap, int exponent, Numeric usage, Numeric *result)
{
	Numeric		rounded = billing_round_money(cap, exponent);

	if (billing_num_cmp(usage, rounded) <= 0)
		return false;
	*result = numeric_sub_opt_error(rounded, usage, NULL);
	return true;
}

PG_FUNCTION_INFO_V1(billing_cap_amount);

/*
 * _cap_amount(cap numeric, currency text, usage numeric) -> numeric: the
 * amount of the spend cap line (NULL: not capped).  The one definition of
 * the cap rule: _rate_periods and _segment_lines use it.
 */
Datum
billing_cap_amount(PG_FUNCTION_ARGS)
{
	Numeric		result;

	if (!cap_amount(PG_GETARG_NUMERIC(0), billing_currency_exponent_of(PG_GETARG_TEXT_PP(1)),
					PG_GETARG_NUMERIC(2), &result))
		PG_RETURN_NULL();
	PG_RETURN_NUMERIC(result);
}

/* seconds of an interval [a, b) as numeric with 6 decimals, as extract(epoch) */
static Numeric
seconds_between(TimestampTz a, TimestampTz b)
{
	return int64_div_fast_to_numeric(b - a, 6);
}

/* "YYYY-MM-DD HH24:MI" of a time in UTC */
static void
utc_minute(TimestampTz t, char *buf, size_t len)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (TIMESTAMP_NOT_FINITE(t) || timestamp2tm(t, NULL, &tm, &fsec, NULL, NULL) != 0)
	{
		snprintf(buf, len, "%s", TIMESTAMP_IS_NOBEGIN(t) ? "-infinity" : "infinity");
		return;
	}
	snprintf(buf, len, "%04d-%02d-%02d %02d:%02d", tm.tm_year, tm.tm_mon, tm.tm_mday,
			 tm.tm_hour, tm.tm_min);
}

PG_FUNCTION_INFO_V1(billing_segment_lines);

/*
 * _segment_lines(rated _invoice_line[], s_idx int[], s_plans text[],
 *                s_starts timestamptz[], s_ends timestamptz[],
 *                currencies text[], caps numeric[], starts timestamptz[],
 *                ends timestamptz[]) -> SETOF _invoice_line
 *
 * The usage and fixed lines of periods rated segment by segment (rated:
 * _rate_periods' lines, idx the segment k; segment k belongs to period
 * s_idx[k], the segments of a period in time order), as the invoice shows
 * them: in a period of more than one segment each line names its segment
 * (" (plan, from to)") and carries it (segment_start, segment_end), and a
 * fixed fee is prorated by the seconds of its segment over those of the
 * period (proration; amount = its rating times that share, rounded once);
 * ord = the segment's place * 100000 + the line's.  Then the period's cap
 * line (ord 1e9) over the usage lines of every segment (_cap_amount).
 */
Datum
billing_segment_lines(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TupleDesc	desc,
				ldesc;
	Datum	  **lvals;
	bool	  **lnulls;
	int			n_lines,
				n_segs,
				n_periods,
				n;
	Datum	   *s_idx,
			   *s_plans,
			   *s_starts,
			   *s_ends,
			   *currencies,
			   *caps,
			   *starts,
			   *ends;
	bool	   *nulls,
			   *cap_nulls;
	int		   *seg_no,
			   *seg_count;
	Numeric    *usage;
	bool	   *has_usage;
	int			a_idx, a_ord, a_kind, a_description, a_amount, a_unrounded,
				a_segment_start, a_segment_end, a_proration;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < 9; i++)
		if (PG_ARGISNULL(i))
			PG_RETURN_NULL();
	desc = rsinfo->setDesc;
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(1), INT4OID, 4, true, TYPALIGN_INT, &s_idx, &nulls, &n_segs);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(2), TEXTOID, -1, false, TYPALIGN_INT, &s_plans, &nulls, &n);
	if (n != n_segs)
		elog(ERROR, "_segment_lines: arrays of different lengths");
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(3), TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &s_starts, &nulls, &n);
	if (n != n_segs)
		elog(ERROR, "_segment_lines: arrays of different lengths");
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(4), TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &s_ends, &nulls, &n);
	if (n != n_segs)
		elog(ERROR, "_segment_lines: arrays of different lengths");
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(5), TEXTOID, -1, false, TYPALIGN_INT, &currencies, &nulls, &n_periods);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(6), NUMERICOID, -1, false, TYPALIGN_INT, &caps, &cap_nulls, &n);
	if (n != n_periods)
		elog(ERROR, "_segment_lines: arrays of different lengths");
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(7), TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &starts, &nulls, &n);
	if (n != n_periods)
		elog(ERROR, "_segment_lines: arrays of different lengths");
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(8), TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &ends, &nulls, &n);
	if (n != n_periods)
		elog(ERROR, "_segment_lines: arrays of different lengths");

	/* each segment's place in its period, and how many its period has */
	seg_no = palloc0(sizeof(int) * (n_segs + 1));
	seg_count = palloc0(sizeof(int) * (n_periods + 1));
	for (int k = 0; k < n_segs; k++)
	{
		int			p = DatumGetInt32(s_idx[k]);

		if (p < 1 || p > n_periods)
			elog(ERROR, "_segment_lines: a segment of period %d, of %d", p, n_periods);
		seg_no[k] = ++seg_count[p];
	}
	usage = palloc(sizeof(Numeric) * (n_periods + 1));
	has_usage = palloc0(sizeof(bool) * (n_periods + 1));

	a_idx = billing_attnum_of(desc, "idx");
	a_ord = billing_attnum_of(desc, "ord");
	a_kind = billing_attnum_of(desc, "kind");
	a_description = billing_attnum_of(desc, "description");
	a_amount = billing_attnum_of(desc, "amount");
	a_unrounded = billing_attnum_of(desc, "unrounded_amount");
	a_segment_start = billing_attnum_of(desc, "segment_start");
	a_segment_end = billing_attnum_of(desc, "segment_end");
	a_proration = billing_attnum_of(desc, "proration");

	n_lines = billing_rows_of(PG_GETARG_ARRAYTYPE_P(0), &ldesc, &lvals, &lnulls);
	if (ldesc->natts != desc->natts)
		elog(ERROR, "_segment_lines: lines of another row type");
	ReleaseTupleDesc(ldesc);
	for (int j = 0; j < n_lines; j++)
	{
		Datum	   *v = lvals[j];
		bool	   *z = lnulls[j];
		int			k,
					p;
		bool		split,
					fixed;

		if (z[a_idx] || z[a_ord] || z[a_kind] || z[a_amount])
			elog(ERROR, "_segment_lines: a line without idx, ord, kind or amount");
		k = DatumGetInt32(v[a_idx]);
		if (k < 1 || k > n_segs)
			elog(ERROR, "_segment_lines: a line of segment %d, of %d", k, n_segs);
		p = DatumGetInt32(s_idx[k - 1]);
		split = seg_count[p] > 1;
		fixed = strcmp(TextDatumGetCString(v[a_kind]), "fixed") == 0;
		v[a_idx] = Int32GetDatum(p);
		v[a_ord] = Int64GetDatum((int64) seg_no[k - 1] * 100000 + DatumGetInt64(v[a_ord]));
		if (split)
		{
			char		from[32],
						to[32];
			char	   *plan = TextDatumGetCString(s_plans[k - 1]);
			char	   *d = z[a_description] ? "" : TextDatumGetCString(v[a_description]);

			utc_minute(DatumGetTimestampTz(s_starts[k - 1]), from, sizeof(from));
			utc_minute(DatumGetTimestampTz(s_ends[k - 1]), to, sizeof(to));
			v[a_description] = CStringGetTextDatum(psprintf("%s (%s, %s to %s)", d, plan, from, to));
			z[a_description] = false;
			v[a_segment_start] = s_starts[k - 1];
			z[a_segment_start] = false;
			v[a_segment_end] = s_ends[k - 1];
			z[a_segment_end] = false;
			if (fixed && !z[a_unrounded])
			{
				Numeric		secs = seconds_between(DatumGetTimestampTz(s_starts[k - 1]),
												   DatumGetTimestampTz(s_ends[k - 1]));
				Numeric		period = seconds_between(DatumGetTimestampTz(starts[p - 1]),
													 DatumGetTimestampTz(ends[p - 1]));
				Numeric		prorated = numeric_div_opt_error(
					numeric_mul_opt_error(DatumGetNumeric(v[a_unrounded]), secs, NULL), period, NULL);

				v[a_unrounded] = NumericGetDatum(prorated);
				v[a_amount] = NumericGetDatum(billing_round_money(prorated,
																  billing_currency_exponent_of(DatumGetTextPP(currencies[p - 1]))));
				v[a_proration] = NumericGetDatum(numeric_div_opt_error(secs, period, NULL));
				z[a_proration] = false;
			}
		}
		if (strcmp(TextDatumGetCString(v[a_kind]), "usage") == 0)
		{
			usage[p] = has_usage[p] ? numeric_add_opt_error(usage[p], DatumGetNumeric(v[a_amount]), NULL)
				: DatumGetNumeric(v[a_amount]);
			has_usage[p] = true;
		}
		tuplestore_putvalues(rsinfo->setResult, desc, v, z);
	}
	/* the cap of each period, over every segment's usage lines */
	for (int p = 1; p <= n_periods; p++)
	{
		Numeric		amount;
		Datum	   *v;
		bool	   *z;

		if (cap_nulls[p - 1] || !has_usage[p] ||
			!cap_amount(DatumGetNumeric(caps[p - 1]), billing_currency_exponent_of(DatumGetTextPP(currencies[p - 1])),
						usage[p], &amount))
			continue;
		v = palloc0(sizeof(Datum) * desc->natts);
		z = palloc(sizeof(bool) * desc->natts);
		memset(z, true, sizeof(bool) * desc->natts);
		v[a_idx] = Int32GetDatum(p);
		z[a_idx] = false;
		v[a_ord] = Int64GetDatum(INT64CONST(1000000000));
		z[a_ord] = false;
		v[a_kind] = CStringGetTextDatum("cap");
		z[a_kind] = false;
		v[a_description] = CStringGetTextDatum("spend cap");
		z[a_description] = false;
		v[a_amount] = NumericGetDatum(amount);
		z[a_amount] = false;
		tuplestore_putvalues(rsinfo->setResult, desc, v, z);
	}
	return (Datum) 0;
}
