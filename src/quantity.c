/*
 * quantity.c
 *		The one limit on usage quantities (SPEC section 10.5: whatever limit
 *		the implementation sets is documented and raises 22023).
 *
 * A quantity that reaches the counters, through any ingest path (record,
 * a metered table, ingest, report_cumulative) or through correct_usage, is
 * less than 10^1000 in absolute value and has at most 1000 digits after
 * the decimal point (as written: numeric's display scale).  Within these
 * bounds everything downstream is exact with a wide margin: a packed cell
 * stores a quantity's text in at most 65,535 characters, and a sum of any
 * number of reports a bucket can hold (at most 2^63) has fewer than 1,020
 * digits before the point; rating multiplies by prices of at most 20
 * fraction digits, far below numeric's 16,383.  Integer quantities and the
 * fixed-point fast path (|q| < 10^18, at most 20 fraction digits) are
 * always inside, so only numerics outside the fast path are looked at.
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/memutils.h"
#include "utils/numeric.h"

#include "billing.h"

PG_FUNCTION_INFO_V1(billing_check_quantity_sql);

/* 10^BILLING_QTY_DIGITS, built once per backend */
static Numeric qty_bound = NULL;

/*
 * billing_check_quantity
 *		Raise 22023 unless q (finite) is within the quantity limit.  meter
 *		and account_id name the report in the message.
 */
void
billing_check_quantity(Numeric q, const char *meter, int64 account_id)
{
	int32		scale;
	Datum		absq;

	if (qty_bound == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
		char		text[16];

		snprintf(text, sizeof(text), "1e%d", BILLING_QTY_DIGITS);
		qty_bound = DatumGetNumeric(DirectFunctionCall3(numeric_in,
														CStringGetDatum(text),
														ObjectIdGetDatum(InvalidOid),
														Int32GetDatum(-1)));
		MemoryContextSwitchTo(old);
	}

	scale = DatumGetInt32(DirectFunctionCall1(numeric_scale, NumericGetDatum(q)));
	if (scale > BILLING_QTY_DIGITS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("usage quantity has too many digits after the decimal point"),
				 errdetail("A quantity has at most %d digits after the decimal point; "
						   "meter \"%s\", account %lld reported one with %d.",
						   BILLING_QTY_DIGITS, meter, (long long) account_id, scale)));

	absq = DirectFunctionCall1(numeric_abs, NumericGetDatum(q));
	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp, absq,
										  NumericGetDatum(qty_bound))) >= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("usage quantity is out of range"),
				 errdetail("A quantity is less than 10^%d in absolute value; "
						   "meter \"%s\", account %lld reported a larger one.",
						   BILLING_QTY_DIGITS, meter, (long long) account_id)));
}

/*
 * billing._check_quantity(quantity numeric, meter text, account_id bigint)
 *		The same check for the paths written in SQL (correct_usage).  NULL
 *		and non-finite quantities are the caller's to refuse first.
 */
Datum
billing_check_quantity_sql(PG_FUNCTION_ARGS)
{
	Numeric		q;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_VOID();
	q = PG_GETARG_NUMERIC(0);
	if (numeric_is_nan(q) || numeric_is_inf(q))
		PG_RETURN_VOID();
	billing_check_quantity(q, text_to_cstring(PG_GETARG_TEXT_PP(1)), PG_GETARG_INT64(2));
	PG_RETURN_VOID();
}
