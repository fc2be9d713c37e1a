/*
 * bin.c
 *		The one time-bin function of the billing extension for intervals
 *		(see billing_bin_start in util.h for widths in microseconds, which
 *		ingest calls per row):
 *
 *		billing._bin(grain interval, ts timestamptz) -> timestamptz
 *
 *		the start of the UTC-aligned bin of width grain holding ts: usage
 *		buckets (a meter's bucket_width), usage roll-ups (billing.usage's
 *		grain), the hour and day roll-ups of compaction, and the buckets
 *		reconcile and correct_usage check, in SQL and in C alike.
 */
#include "postgres.h"

#include "common/int.h"
#include "fmgr.h"
#include "pgtime.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "util.h"

PG_FUNCTION_INFO_V1(billing_bin);

/*
 * billing_bin_checked
 *		billing_bin_start(ts, width) for a finite ts of any value, with
 *		date_bin's errors: 22008 when the distance of ts from 1970-01-01
 *		UTC, or the bin's start, leaves the range of timestamps.  For paths
 *		that take timestamps from SQL (ingest has checked its own first).
 */
TimestampTz
billing_bin_checked(TimestampTz ts, int64 width)
{
	int64		shifted;
	TimestampTz bin;

	if (pg_add_s64_overflow(ts, UNIX_EPOCH_USEC, &shifted))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	bin = billing_bin_start(ts, width);
	if (!IS_VALID_TIMESTAMP(bin))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	return bin;
}

/*
 * billing_bin_interval
 *		The start of the UTC-aligned bin of width grain holding ts: for days
 *		and time, billing_bin_start (date_bin(grain, ts, '1970-01-01
 *		00:00:00+00'), a day being 24 hours, and like date_bin 22008 for a ts
 *		whose distance from 1970 does not fit); for whole months, the first of
 *		the month (UTC) that is a multiple of the grain's months since
 *		January 1970.  An infinite ts is its own bin.  A grain that is not
 *		positive, or mixes months with days or time, raises 22023.
 */
TimestampTz
billing_bin_interval(const Interval *grain, TimestampTz ts)
{
	int64		usecs;

	if (TIMESTAMP_NOT_FINITE(ts))
		return ts;
	if (grain->month != 0)
	{
		struct pg_tm tm;
		fsec_t		fsec;
		int64		months,
					bin;
		TimestampTz result;

		if (grain->day != 0 || grain->time != 0 || grain->month < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid bin width \"%d months %d days %lld microseconds\"",
							grain->month, grain->day, (long long) grain->time),
					 errhint("Use a positive interval of days and time or of whole months.")));
		/* no time zone: the fields in UTC */
		if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
					 errmsg("timestamp out of range")));
		months = (int64) (tm.tm_year - 1970) * MONTHS_PER_YEAR + (tm.tm_mon - 1);
		/* the greatest multiple of grain->month at or below months */
		bin = months - ((months % grain->month) + grain->month) % grain->month;
		memset(&tm, 0, sizeof(tm));
		tm.tm_year = 1970 + (int) (bin >= 0 ? bin / MONTHS_PER_YEAR :
								   -((-bin + MONTHS_PER_YEAR - 1) / MONTHS_PER_YEAR));
		tm.tm_mon = (int) (bin - (int64) (tm.tm_year - 1970) * MONTHS_PER_YEAR) + 1;
		tm.tm_mday = 1;
		if (tm2timestamp(&tm, 0, NULL, &result) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
					 errmsg("timestamp out of range")));
		return result;
	}
	usecs = grain->time + (int64) grain->day * USECS_PER_DAY;
	if (usecs <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid bin width \"%d days %lld microseconds\"",
						grain->day, (long long) grain->time),
				 errhint("Use a positive interval of days and time or of whole months.")));
	return billing_bin_checked(ts, usecs);
}

/*
 * billing_bin
 *		billing._bin(grain, ts): billing_bin_interval.
 */
Datum
billing_bin(PG_FUNCTION_ARGS)
{
	PG_RETURN_TIMESTAMPTZ(billing_bin_interval(PG_GETARG_INTERVAL_P(0),
											   PG_GETARG_TIMESTAMPTZ(1)));
}
