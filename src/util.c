/*
 * util.c
 *		Helpers shared by the modules of the billing extension (see util.h):
 *		the aggregation parser, argument arrays, kept SPI plans and growable
 *		arrays.
 */
#include "postgres.h"

#include "executor/spi.h"
#include "utils/array.h"
#include "utils/memutils.h"

#include "util.h"

/*
 * billing_aggregation
 *		The aggregation named name.  billing.meters allows only the five
 *		names (a CHECK constraint), so any other is an internal error, never
 *		a silent choice.  A unique meter's cells count its reports as a
 *		count meter's do (its distinct values are counted at read time and
 *		by compaction, see sql/install/46_unique.sql).
 */
Aggregation
billing_aggregation(const char *name)
{
	if (strcmp(name, "sum") == 0)
		return AGG_SUM;
	if (strcmp(name, "count") == 0 || strcmp(name, "unique") == 0)
		return AGG_COUNT;
	if (strcmp(name, "max") == 0)
		return AGG_MAX;
	if (strcmp(name, "last") == 0)
		return AGG_LAST;
	elog(ERROR, "unknown aggregation \"%s\"", name);
	return AGG_SUM;				/* keep the compiler quiet */
}

/*
 * billing_array_elems
 *		Deconstruct a one-dimensional array argument; raises 22004 on NULL
 *		elements (when nulls_ok is false) and, when expect >= 0, 22023 on a
 *		length other than expect (the arrays of an ingest batch).
 */
int
billing_array_elems(ArrayType *a, Oid type, int len, bool byval, char align,
					Datum **elems, bool **nulls, int expect, const char *name,
					bool nulls_ok)
{
	int			n;

	if (ARR_NDIM(a) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a one-dimensional array", name)));
	deconstruct_array(a, type, len, byval, align, elems, nulls, &n);
	if (expect >= 0 && n != expect)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the arrays of a batch must have the same length"),
				 errdetail("account_ids has %d elements, %s has %d.", expect, name, n)));
	if (!nulls_ok)
		for (int i = 0; i < n; i++)
			if ((*nulls)[i])
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("element %d of %s must not be null", i + 1, name)));
	return n;
}

/*
 * billing_spi_plan
 *		The plan of sql kept in *plan for the life of the backend, prepared
 *		with SPI (connected) on first use.  cursor_options
 *		CURSOR_OPT_GENERIC_PLAN plans once for any parameters; 0 lets the
 *		planner choose per execution (Citus then prunes by the parameters'
 *		values).
 */
SPIPlanPtr
billing_spi_plan(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types,
				 int cursor_options)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare_cursor(sql, nargs, types, cursor_options);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	return *plan;
}

/*
 * billing_grow
 *		A growable array that is full (*cap elements of elsize bytes, NULL
 *		when *cap is 0), doubled, or of first elements when new, in cxt;
 *		*cap is updated.
 */
void *
billing_grow(void *array, int *cap, Size elsize, int first, MemoryContext cxt)
{
	*cap = *cap ? *cap * 2 : first;
	if (array == NULL)
		return MemoryContextAlloc(cxt, *cap * elsize);
	return repalloc(array, *cap * elsize);
}
