/*
 * agg.c
 *		How usage cells combine (see agg.h), in C for ingest and the period
 *		totals, and as the SQL aggregate every reader folds cells
 *		with:
 *
 *		billing._cell_agg(aggregation text, quantity numeric,
 *						  last_ts timestamptz, last_seq bigint) -> numeric
 *
 *		the meter's value over the cells of a group (NULL last_ts or
 *		last_seq: unknown, the earliest), and _cell_last_ts and
 *		_cell_last_seq, the same aggregate giving the last_ts and last_seq of
 *		that value (what a compacted cell keeps).  Their state is the same
 *		UsageCell that billing_cell_combine folds, so SQL and C cannot
 *		disagree.  For two values at a time:
 *
 *		billing._combine(aggregation, q1, ts1, seq1, q2, ts2, seq2) -> numeric
 *		billing._last_later(ts1, seq1, ts2, seq2) -> boolean
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "agg.h"

PG_FUNCTION_INFO_V1(billing_cell_agg_step);
PG_FUNCTION_INFO_V1(billing_cell_agg_final);
PG_FUNCTION_INFO_V1(billing_cell_agg_last_ts);
PG_FUNCTION_INFO_V1(billing_cell_agg_last_seq);
PG_FUNCTION_INFO_V1(billing_combine);
PG_FUNCTION_INFO_V1(billing_last_later_sql);

/*
 * billing_cell_numeric
 *		The cell's quantity as a numeric.
 */
Numeric
billing_cell_numeric(const UsageCell *c)
{
	return c->num;
}

/*
 * billing_cell_set_numeric
 *		Set the cell's quantity to n (not copied).
 */
void
billing_cell_set_numeric(UsageCell *c, Numeric n)
{
	c->num = n;
}

/* -1, 0, 1 as the quantity of a is less than, equal to, greater than b's */
int
billing_cell_qty_cmp(const UsageCell *a, const UsageCell *b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a->num),
											 NumericGetDatum(b->num)));
}

/*
 * take_value
 *		into takes v's value (quantity and, for last, its timestamp and
 *		arrival); the events are the caller's.
 */
static inline void
take_value(UsageCell *into, const UsageCell *v)
{
	into->num = v->num;
	into->last_ts = v->last_ts;
	into->last_seq = v->last_seq;
}

/*
 * billing_cell_combine
 *		Fold v into into by aggregation agg (agg.h); into keeps its bucket.
 *		A numeric result is allocated in the current memory context (or
 *		shared with v): callers that keep cells past it copy them
 *		(billing_cell_keep).  Raises 22003 when the event count overflows.
 */
void
billing_cell_combine(Aggregation agg, UsageCell *into, const UsageCell *v)
{
	int64		events;

	if (pg_add_s64_overflow(into->events, v->events, &events))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("event count of a usage bucket is out of range")));
	switch (agg)
	{
		case AGG_SUM:
		case AGG_COUNT:
			into->num = DatumGetNumeric(DirectFunctionCall2(numeric_add,
															NumericGetDatum(into->num),
															NumericGetDatum(v->num)));
			break;
		case AGG_MAX:
			if (billing_cell_qty_cmp(v, into) > 0)
				take_value(into, v);
			break;
		case AGG_LAST:
			if (billing_last_later(v->last_ts, v->last_seq, into->last_ts, into->last_seq) ||
				(v->last_ts == into->last_ts && v->last_seq == into->last_seq &&
				 billing_cell_qty_cmp(v, into) > 0))
				take_value(into, v);
			break;
	}
	into->events = events;
}

/*
 * billing_cell_keep
 *		Copy the cell's numeric quantity, if any, into cxt.
 */
void
billing_cell_keep(UsageCell *c, MemoryContext cxt)
{
	if (c->num != NULL)
	{
		Numeric		copy = MemoryContextAlloc(cxt, VARSIZE(c->num));

		memcpy(copy, c->num, VARSIZE(c->num));
		c->num = copy;
	}
}

/*
 * The state of billing._cell_agg: the aggregation (parsed once) and the
 * value so far, in the aggregate's memory context.
 */
typedef struct CellAggState
{
	Aggregation agg;
	bool		any;
	UsageCell	acc;
	MemoryContext cxt;
} CellAggState;

/*
 * billing_cell_agg_step
 *		_cell_agg's transition: fold one (quantity, last_ts, last_seq) in.
 *		Rows with a NULL quantity are skipped; a NULL aggregation counts as
 *		sum.
 */
Datum
billing_cell_agg_step(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	CellAggState *st = PG_ARGISNULL(0) ? NULL : (CellAggState *) PG_GETARG_POINTER(0);
	UsageCell	v;
	MemoryContext old;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "billing._cell_agg called in a non-aggregate context");
	if (st == NULL)
	{
		st = MemoryContextAllocZero(aggcxt, sizeof(CellAggState));
		st->cxt = aggcxt;
		st->agg = PG_ARGISNULL(1) ? AGG_SUM :
			billing_aggregation(text_to_cstring(PG_GETARG_TEXT_PP(1)));
	}
	if (PG_ARGISNULL(2))
		PG_RETURN_POINTER(st);

	memset(&v, 0, sizeof(v));
	billing_cell_set_numeric(&v, PG_GETARG_NUMERIC(2));
	v.last_ts = PG_ARGISNULL(3) ? AGG_NO_TS : PG_GETARG_TIMESTAMPTZ(3);
	v.last_seq = PG_ARGISNULL(4) ? AGG_NO_SEQ : PG_GETARG_INT64(4);

	old = MemoryContextSwitchTo(st->cxt);
	if (!st->any)
	{
		st->acc = v;
		st->any = true;
		billing_cell_keep(&st->acc, st->cxt);
	}
	else
	{
		Numeric		before = st->acc.num;

		billing_cell_combine(st->agg, &st->acc, &v);
		/* a numeric taken from the row lives only as long as the row */
		if (st->acc.num != before)
		{
			if (st->acc.num == v.num)
				billing_cell_keep(&st->acc, st->cxt);
			if (before != NULL)
				pfree(before);
		}
	}
	MemoryContextSwitchTo(old);
	PG_RETURN_POINTER(st);
}

/*
 * billing_cell_agg_final
 *		_cell_agg's result: the folded quantity, NULL without cells.
 */
Datum
billing_cell_agg_final(PG_FUNCTION_ARGS)
{
	CellAggState *st = PG_ARGISNULL(0) ? NULL : (CellAggState *) PG_GETARG_POINTER(0);

	if (st == NULL || !st->any)
		PG_RETURN_NULL();
	PG_RETURN_NUMERIC(billing_cell_numeric(&st->acc));
}

/*
 * billing_cell_agg_last_ts
 *		_cell_last_ts's result: the last_ts of the folded value (NULL when
 *		unknown or without cells).
 */
Datum
billing_cell_agg_last_ts(PG_FUNCTION_ARGS)
{
	CellAggState *st = PG_ARGISNULL(0) ? NULL : (CellAggState *) PG_GETARG_POINTER(0);

	if (st == NULL || !st->any || st->acc.last_ts == AGG_NO_TS)
		PG_RETURN_NULL();
	PG_RETURN_TIMESTAMPTZ(st->acc.last_ts);
}

/*
 * billing_cell_agg_last_seq
 *		_cell_last_seq's result: the last_seq of the folded value (NULL when
 *		unknown or without cells).
 */
Datum
billing_cell_agg_last_seq(PG_FUNCTION_ARGS)
{
	CellAggState *st = PG_ARGISNULL(0) ? NULL : (CellAggState *) PG_GETARG_POINTER(0);

	if (st == NULL || !st->any || st->acc.last_seq == AGG_NO_SEQ)
		PG_RETURN_NULL();
	PG_RETURN_INT64(st->acc.last_seq);
}

/*
 * billing_combine
 *		billing._combine(aggregation, q1, ts1, seq1, q2, ts2, seq2): two
 *		values of one cell combined by billing_cell_combine.  A NULL
 *		quantity is no value (the other is the result); a NULL aggregation
 *		counts as sum.
 */
Datum
billing_combine(PG_FUNCTION_ARGS)
{
	Aggregation agg;
	UsageCell	a,
				b;

	if (PG_ARGISNULL(1) && PG_ARGISNULL(4))
		PG_RETURN_NULL();
	if (PG_ARGISNULL(1))
		PG_RETURN_DATUM(PG_GETARG_DATUM(4));
	if (PG_ARGISNULL(4))
		PG_RETURN_DATUM(PG_GETARG_DATUM(1));
	agg = PG_ARGISNULL(0) ? AGG_SUM :
		billing_aggregation(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	memset(&a, 0, sizeof(a));
	memset(&b, 0, sizeof(b));
	billing_cell_set_numeric(&a, PG_GETARG_NUMERIC(1));
	a.last_ts = PG_ARGISNULL(2) ? AGG_NO_TS : PG_GETARG_TIMESTAMPTZ(2);
	a.last_seq = PG_ARGISNULL(3) ? AGG_NO_SEQ : PG_GETARG_INT64(3);
	billing_cell_set_numeric(&b, PG_GETARG_NUMERIC(4));
	b.last_ts = PG_ARGISNULL(5) ? AGG_NO_TS : PG_GETARG_TIMESTAMPTZ(5);
	b.last_seq = PG_ARGISNULL(6) ? AGG_NO_SEQ : PG_GETARG_INT64(6);
	billing_cell_combine(agg, &a, &b);
	PG_RETURN_NUMERIC(billing_cell_numeric(&a));
}

/*
 * billing_last_later_sql
 *		billing._last_later(ts1, seq1, ts2, seq2): is a value stamped ts1
 *		that arrived as seq1 later than one stamped ts2 that arrived as
 *		seq2 (billing_last_later; NULL: unknown, the earliest)?  Where a
 *		compacted cell takes a new value's last_ts and last_seq.
 */
Datum
billing_last_later_sql(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(billing_last_later(PG_ARGISNULL(0) ? AGG_NO_TS : PG_GETARG_TIMESTAMPTZ(0),
									  PG_ARGISNULL(1) ? AGG_NO_SEQ : PG_GETARG_INT64(1),
									  PG_ARGISNULL(2) ? AGG_NO_TS : PG_GETARG_TIMESTAMPTZ(2),
									  PG_ARGISNULL(3) ? AGG_NO_SEQ : PG_GETARG_INT64(3)));
}
