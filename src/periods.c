/*
 * periods.c
 *		The buckets of a billing period: which bucket starts a period bills,
 *		and which bucket widths a plan's period may bill at all (issue 13,
 *		SPEC section 10.5).
 *
 * Usage is counted in buckets [b, b + width) aligned to 1970-01-01 UTC
 * (date_bin's origin).  A billing period [ps, pe) of a subscription bills,
 * for a meter of bucket width w, the buckets whose start lies in [lo, pe):
 *
 *		lo = ps                 for every period but a subscription's first;
 *		lo = date_bin(w, ps)    for the first period, so that the bucket
 *								straddling the subscription's start is billed,
 *								unless an earlier subscription of the account
 *								reaches into that bucket (it bills it: its
 *								last period holds the bucket's start);
 *
 * so every bucket is billed exactly once: a bucket straddling a period
 * boundary, or a subscription's end, goes to the period holding its start.
 * The caller says how far back a period may reach with usage_from: ps for
 * a period that is not a subscription's first, else the end of the
 * account's previous subscription (-infinity when there is none); then
 * lo = date_bin(w, ps) when that is at or after usage_from, else ps.
 * billing._period_usage_from (SQL) computes usage_from from the
 * subscriptions; billing._rate_periods asks the usage store for [lo, pe)
 * per period and meter.
 *
 * A plan's period must be a whole multiple of the bucket width of every
 * meter it charges, so that every period of a subscription starts at the
 * same point of a bucket: a period of days and time is a multiple of w
 * when its length is; a period of whole months (in UTC, so a whole number
 * of days) is when w divides one day.
 */
#include "postgres.h"

#include "common/int.h"
#include "datatype/timestamp.h"
#include "fmgr.h"
#include "utils/timestamp.h"

#include "billing.h"
#include "util.h"

PG_FUNCTION_INFO_V1(billing_period_first_bucket);
PG_FUNCTION_INFO_V1(billing_period_fits_width);

/*
 * bucket_width_usecs
 *		The length of a bucket width in microseconds, as date_bin counts it
 *		(a day is 24 hours).  The width must be positive and hold no months
 *		(billing.meters checks both): 22023 otherwise.
 */
static int64
bucket_width_usecs(const Interval *width)
{
	int64		usecs;

	if (width->month != 0 ||
		pg_mul_s64_overflow((int64) width->day, USECS_PER_DAY, &usecs) ||
		pg_add_s64_overflow(usecs, width->time, &usecs) ||
		usecs <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid bucket width"),
				 errdetail("A bucket width is a positive interval of days and time, without months.")));
	return usecs;
}

/*
 * bucket_start_of
 *		The start of the bucket of width usecs (> 0) holding t, a finite
 *		timestamp: date_bin(width, t, '1970-01-01 00:00:00+00').
 */
static TimestampTz
bucket_start_of(TimestampTz t, int64 width)
{
	/* the one bin function (bin.c), with date_bin's range errors */
	return billing_bin_checked(t, width);
}

/*
 * period_first_bucket
 *		The first bucket start a billing period starting at ps bills, for a
 *		meter of bucket width usecs, when the period may reach back to
 *		usage_from (see the top of the file): the start of the bucket
 *		holding ps when that is at or after usage_from, else ps.  The
 *		period bills the buckets starting in [this, its end).
 */
static TimestampTz
period_first_bucket(TimestampTz ps, TimestampTz usage_from, int64 width)
{
	TimestampTz b = bucket_start_of(ps, width);

	return b >= usage_from ? b : ps;
}

/*
 * period_fits_width
 *		Is a plan's period a whole multiple of a meter's bucket width?  A
 *		period of whole months (no days or time) is when the width divides
 *		a day; a period of days and time when its length (a day being 24
 *		hours, as billing periods are computed in UTC) is a multiple of the
 *		width.  A period mixing months with days or time never is.
 */
static bool
period_fits_width(const Interval *period, const Interval *width)
{
	int64		w = bucket_width_usecs(width);
	int64		p;

	if (period->month != 0)
		return period->day == 0 && period->time == 0 && USECS_PER_DAY % w == 0;
	if (pg_mul_s64_overflow((int64) period->day, USECS_PER_DAY, &p) ||
		pg_add_s64_overflow(p, period->time, &p) ||
		p <= 0)
		return false;
	return p % w == 0;
}

/*
 * billing_period_first_bucket
 *		billing._period_first_bucket(period_start timestamptz, usage_from
 *		timestamptz, bucket_width interval) RETURNS timestamptz: see
 *		period_first_bucket.  period_start must be finite (22008).
 */
Datum
billing_period_first_bucket(PG_FUNCTION_ARGS)
{
	TimestampTz ps = PG_GETARG_TIMESTAMPTZ(0);
	TimestampTz usage_from = PG_GETARG_TIMESTAMPTZ(1);
	Interval   *width = PG_GETARG_INTERVAL_P(2);

	if (TIMESTAMP_NOT_FINITE(ps))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("a billing period must have finite bounds")));
	PG_RETURN_TIMESTAMPTZ(period_first_bucket(ps, usage_from, bucket_width_usecs(width)));
}

/*
 * billing_period_fits_width
 *		billing._period_fits_width(period interval, bucket_width interval)
 *		RETURNS boolean: see period_fits_width.
 */
Datum
billing_period_fits_width(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(period_fits_width(PG_GETARG_INTERVAL_P(0), PG_GETARG_INTERVAL_P(1)));
}
