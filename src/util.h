/*
 * util.h
 *		Small helpers every module of the billing extension may use: the one
 *		aggregation enum and its parser, the one time-bin function, argument
 *		arrays, text bytes, kept SPI plans and growable arrays.  Nothing here knows about
 *		ingest, prices or invoices.
 */
#ifndef BILLING_UTIL_H
#define BILLING_UTIL_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/array.h"

/*
 * A meter's aggregation, as billing.meters.aggregation names it (its CHECK
 * constraint allows exactly these four).
 */
typedef enum Aggregation
{
	AGG_SUM,
	AGG_COUNT,
	AGG_MAX,
	AGG_LAST
} Aggregation;

extern Aggregation billing_aggregation(const char *name);

/* offset from the PostgreSQL epoch (2000) back to the Unix epoch (1970) */
#define UNIX_EPOCH_USEC		((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY)

/*
 * billing_bin_start
 *		Start of the bin of width usec (> 0) that holds ts, aligned to
 *		multiples of the width since 1970-01-01 00:00 UTC (date_bin with the
 *		Unix epoch as origin).  Usage buckets and the hour and day edges of
 *		billing periods are all such bins.  Inline: ingest calls it per row.
 */
static inline TimestampTz
billing_bin_start(TimestampTz ts, int64 width)
{
	int64		t = ts + UNIX_EPOCH_USEC;
	int64		r = t % width;

	if (r < 0)
		r += width;
	return ts - r;
}

/* bin.c: billing_bin_start with date_bin's range errors; the bin of an interval */
extern TimestampTz billing_bin_checked(TimestampTz ts, int64 width);
extern TimestampTz billing_bin_interval(const Interval *grain, TimestampTz ts);

/*
 * billing_text_bytes
 *		The bytes of a text-like value (text, varchar), without copying.
 */
static inline void
billing_text_bytes(Datum d, const char **s, int *len)
{
	text	   *t = DatumGetTextPP(d);

	*s = VARDATA_ANY(t);
	*len = VARSIZE_ANY_EXHDR(t);
}

extern int	billing_array_elems(ArrayType *a, Oid type, int len, bool byval, char align,
								Datum **elems, bool **nulls, int expect, const char *name,
								bool nulls_ok);
extern SPIPlanPtr billing_spi_plan(SPIPlanPtr *plan, const char *sql, int nargs,
								   Oid *types, int cursor_options);
extern void *billing_grow(void *array, int *cap, Size elsize, int first,
						  MemoryContext cxt);

#endif							/* BILLING_UTIL_H */
