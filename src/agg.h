/*
 * agg.h
 *		The one definition of how usage cells combine (SPEC section 2): every
 *		path that merges two values of a counter cell, or folds cells into a
 *		roll-up or a period total, goes through here: ingest (the reports of
 *		one statement), compaction (billing._combine, billing._last_later
 *		and billing._cell_agg), the period totals (totals.c) and every
 *		reader (the SQL aggregate billing._cell_agg), on one node and on
 *		Citus.
 *
 *		sum, count	quantities add
 *		max			the larger quantity
 *		last		the quantity of the latest report: the greater
 *					(last_ts, last_seq), last_seq being the arrival order
 *					(so on a timestamp tie the later arrival wins); a value
 *					without a timestamp or an arrival number counts as the
 *					earliest; equal (last_ts, last_seq), which two arrivals
 *					never have, keeps the greater quantity, so that the result
 *					never depends on the order cells are folded in
 *
 * and every cell's events add.  The rule is associative and commutative:
 * cells may be folded in any order and grouping (minute cells into hours,
 * hours into days, days into a period) with the same result.
 */
#ifndef BILLING_AGG_H
#define BILLING_AGG_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "utils/numeric.h"

#include "util.h"

/*
 * the earliest possible value of last_ts and last_seq: "not known" (SQL
 * NULL; a timestamp of -infinity, which no report has, reads as unknown)
 */
#define AGG_NO_TS			PG_INT64_MIN
#define AGG_NO_SEQ			PG_INT64_MIN

/*
 * One counter cell: its bucket, its value by the meter's aggregation, its
 * report count, and for last meters the timestamp and arrival number of
 * the value (AGG_NO_TS / AGG_NO_SEQ when unknown).
 */
typedef struct UsageCell
{
	TimestampTz bucket;
	int64		events;
	Numeric		num;			/* numeric arithmetic keeps the display scale */
	TimestampTz last_ts;
	int64		last_seq;
} UsageCell;

/*
 * billing_last_later
 *		The tie rule of last meters: is a report stamped ts_a that arrived
 *		as seq_a later than one stamped ts_b that arrived as seq_b?  Ingest
 *		applies it to the reports of one statement (seq: their order in the
 *		statement), everything else to cells (seq: billing.usage_seq).
 */
static inline bool
billing_last_later(TimestampTz ts_a, int64 seq_a, TimestampTz ts_b, int64 seq_b)
{
	return ts_a > ts_b || (ts_a == ts_b && seq_a > seq_b);
}

extern Numeric billing_cell_numeric(const UsageCell *c);
extern void billing_cell_set_numeric(UsageCell *c, Numeric n);
extern int	billing_cell_qty_cmp(const UsageCell *a, const UsageCell *b);
extern void billing_cell_combine(Aggregation agg, UsageCell *into, const UsageCell *v);
extern void billing_cell_keep(UsageCell *c, MemoryContext cxt);

#endif							/* BILLING_AGG_H */
