/*
 * copy_input.c
 *		Faster input functions for a COPY into a metered table.
 *
 * In a COPY of usage rows that billing's hook runs (ingest_copy.c: counted
 * without the triggers, or PostgreSQL's CopyFrom), PostgreSQL's
 * timestamptz_in takes about 40% of the statement: it is a
 * general parser (time zone names, abbreviations, DateStyle, special
 * values), while usage files carry their timestamps in one form, the ISO
 * form timestamptz prints:
 *
 *		YYYY-MM-DD HH:MM:SS[.ffffff]+HH[:MM]     (or T between date and time)
 *
 * The functions here read that form, and plain unsigned integers for
 * numeric (built in numeric's on-disk form by decimal.c), directly; any
 * other text (another form, a value out of range, a typmod to apply) goes
 * to PostgreSQL's own input function, which gives the result or raises its
 * error.  The form read here is exact: a numeric UTC offset, so neither
 * TimeZone, DateStyle nor timezone_abbreviations can change its meaning,
 * and fractions of at most 6 digits, which timestamptz keeps whole.  pgTAP
 * copy_input.sql compares both parsers on generated text
 * (billing._copy_timestamptz_fast and _copy_numeric_fast show what the
 * reader alone returns).
 */
#include "postgres.h"

#include "commands/copyfrom_internal.h"
#include "datatype/timestamp.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/fmgroids.h"
#include "utils/fmgrprotos.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "decimal.h"
#include "ingest.h"

PG_FUNCTION_INFO_V1(billing_copy_timestamptz_fast);
PG_FUNCTION_INFO_V1(billing_copy_numeric_fast);

/* n decimal digits at s as an int, or -1 when one is not a digit */
static inline int
digits(const char *s, int n)
{
	int			v = 0;

	for (int i = 0; i < n; i++)
	{
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (s[i] - '0');
	}
	return v;
}

/*
 * parse_timestamptz
 *		Read s in the ISO form above into *result; false when s is not in
 *		that form or a field is out of its range (PostgreSQL then decides).
 *		Days per month are PostgreSQL's own table (day_tab, isleap), the one
 *		its date validation uses.
 */
static bool
parse_timestamptz(const char *s, TimestampTz *result)
{
	int			year,
				mon,
				mday,
				hour,
				min,
				sec,
				tzh,
				tzm = 0;
	int64		fsec = 0;
	int			sign;
	const char *p;

	/* YYYY-MM-DD */
	year = digits(s, 4);
	if (year < 1 || s[4] != '-' || (mon = digits(s + 5, 2)) < 1 || mon > 12 ||
		s[7] != '-' || (mday = digits(s + 8, 2)) < 1)
		return false;
	if (mday > day_tab[isleap(year)][mon - 1])
		return false;
	/* ' ' or 'T', HH:MM:SS */
	if ((s[10] != ' ' && s[10] != 'T') ||
		(hour = digits(s + 11, 2)) < 0 || hour > 23 || s[13] != ':' ||
		(min = digits(s + 14, 2)) < 0 || min > 59 || s[16] != ':' ||
		(sec = digits(s + 17, 2)) < 0 || sec > 59)
		return false;
	p = s + 19;
	/* .f to .ffffff */
	if (*p == '.')
	{
		int			n = 0;

		p++;
		while (*p >= '0' && *p <= '9')
		{
			if (++n > 6)
				return false;
			fsec = fsec * 10 + (*p++ - '0');
		}
		if (n == 0)
			return false;
		while (n++ < 6)
			fsec *= 10;
	}
	/* +HH or +HH:MM, up to PostgreSQL's limit of 15 hours */
	if (*p == '+')
		sign = 1;
	else if (*p == '-')
		sign = -1;
	else
		return false;
	if ((tzh = digits(p + 1, 2)) < 0 || tzh > 15)
		return false;
	p += 3;
	if (*p == ':')
	{
		if ((tzm = digits(p + 1, 2)) < 0 || tzm > 59)
			return false;
		p += 3;
	}
	if (*p != '\0')
		return false;

	/* years 1 to 9999, shifted by at most 16 hours, are valid timestamps */
	*result = (int64) (date2j(year, mon, mday) - POSTGRES_EPOCH_JDATE) * USECS_PER_DAY +
		((int64) ((hour * 60 + min) * 60 + sec)) * USECS_PER_SEC + fsec -
		(int64) sign * (tzh * 3600 + tzm * 60) * USECS_PER_SEC;
	return true;
}

/*
 * parse_count
 *		Read s, 1 to 18 decimal digits and nothing else, into *result.
 */
static bool
parse_count(const char *s, int64 *result)
{
	int64		v = 0;
	int			n = 0;

	for (; s[n] >= '0' && s[n] <= '9'; n++)
	{
		if (n == 18)
			return false;
		v = v * 10 + (s[n] - '0');
	}
	if (n == 0 || s[n] != '\0')
		return false;
	*result = v;
	return true;
}

/* timestamptz input for COPY: the ISO form read here, anything else by timestamptz_in */
static Datum
copy_timestamptz_in(PG_FUNCTION_ARGS)
{
	TimestampTz ts;

	if (PG_GETARG_INT32(2) == -1 && parse_timestamptz(PG_GETARG_CSTRING(0), &ts))
		PG_RETURN_TIMESTAMPTZ(ts);
	return timestamptz_in(fcinfo);
}

/* numeric input for COPY: unsigned integers read here, anything else by numeric_in */
static Datum
copy_numeric_in(PG_FUNCTION_ARGS)
{
	int64		v;

	if (PG_GETARG_INT32(2) == -1 && parse_count(PG_GETARG_CSTRING(0), &v))
		PG_RETURN_NUMERIC(billing_dec_to_numeric((int128_t) v, 0));
	return numeric_in(fcinfo);
}

/*
 * billing_copy_fast_inputs
 *		Have cstate (a COPY FROM in text or CSV format) read timestamptz and
 *		numeric columns with the functions above.
 */
void
billing_copy_fast_inputs(CopyFromState cstate)
{
	ListCell   *lc;

	if (cstate->opts.binary)
		return;
	foreach(lc, cstate->attnumlist)
	{
		FmgrInfo   *f = &cstate->in_functions[lfirst_int(lc) - 1];

		if (f->fn_oid == F_TIMESTAMPTZ_IN)
			f->fn_addr = copy_timestamptz_in;
		else if (f->fn_oid == F_NUMERIC_IN)
			f->fn_addr = copy_numeric_in;
	}
}

/*
 * billing._copy_timestamptz_fast(value text), billing._copy_numeric_fast(value text)
 *		What the reader above alone makes of value; NULL when it leaves value
 *		to PostgreSQL's input function (tests).
 */
Datum
billing_copy_timestamptz_fast(PG_FUNCTION_ARGS)
{
	TimestampTz ts;

	if (!parse_timestamptz(text_to_cstring(PG_GETARG_TEXT_PP(0)), &ts))
		PG_RETURN_NULL();
	PG_RETURN_TIMESTAMPTZ(ts);
}

Datum
billing_copy_numeric_fast(PG_FUNCTION_ARGS)
{
	int64		v;

	if (!parse_count(text_to_cstring(PG_GETARG_TEXT_PP(0)), &v))
		PG_RETURN_NULL();
	PG_RETURN_NUMERIC(billing_dec_to_numeric((int128_t) v, 0));
}
