/*
 * compact_sort.c
 *		A batch sorted and combined (step 2 of compact.h).
 *
 * The batch's series are ranked by their (meter, dimension) bytes, the
 * order of COLLATE "C" that the rows of usage_days have; each cell's
 * series index becomes its series rank, and the cells are sorted by
 * (account, series rank, bucket) with a sort whose comparison is inlined.
 * Cells of one key, from different delta rows, are then combined into one
 * by the rule of the meter's aggregation (src/agg.c).
 */
#include "postgres.h"

#include "compact.h"

/* order of series by (meter, dimension) bytes, as COLLATE "C" */
static int
series_cmp(const void *a, const void *b)
{
	const Series *x = *(Series *const *) a;
	const Series *y = *(Series *const *) b;
	int			c;

	c = memcmp(x->meter->name, y->meter->name, Min(x->meter->len, y->meter->len));
	if (c != 0)
		return c;
	if (x->meter->len != y->meter->len)
		return x->meter->len < y->meter->len ? -1 : 1;
	c = memcmp(x->dim, y->dim, Min(x->dimlen, y->dimlen));
	if (c != 0)
		return c;
	return (x->dimlen > y->dimlen) - (x->dimlen < y->dimlen);
}

/* order of batch cells by (account, series rank, bucket) */
static inline int
cell_cmp(const BatchCell *x, const BatchCell *y)
{
	if (x->account != y->account)
		return x->account < y->account ? -1 : 1;
	if (x->series != y->series)
		return x->series < y->series ? -1 : 1;
	if (x->c.bucket != y->c.bucket)
		return x->c.bucket < y->c.bucket ? -1 : 1;
	return 0;
}

/* sort_cells(cells, n): a sort of batch cells with cell_cmp inlined */
#define ST_SORT sort_cells
#define ST_ELEMENT_TYPE BatchCell
#define ST_COMPARE(a, b) cell_cmp(a, b)
#define ST_SCOPE static
#define ST_DECLARE
#define ST_DEFINE
#include "lib/sort_template.h"

/*
 * billing_compact_sort
 *		Rank the batch's series by (meter, dimension), sort its cells by
 *		(account, series rank, bucket) and combine the cells of one key
 *		(step 2 of compact.h); *any_unique is set when a series is of a
 *		unique meter.  Returns the series by rank (in the batch's context).
 */
Series **
billing_compact_sort(Compaction *cp, bool *any_unique)
{
	Series	  **by_rank;
	int			n = 0;
	MemoryContext old = MemoryContextSwitchTo(cp->batch_cxt);

	by_rank = palloc(cp->nseries * sizeof(Series *));
	memcpy(by_rank, cp->series, cp->nseries * sizeof(Series *));
	qsort(by_rank, cp->nseries, sizeof(Series *), series_cmp);
	for (int r = 0; r < cp->nseries; r++)
	{
		by_rank[r]->rank = r;
		*any_unique |= by_rank[r]->meter->is_unique;
	}
	for (int i = 0; i < cp->ncells; i++)
		cp->cells[i].series = cp->series[cp->cells[i].series]->rank;
	sort_cells(cp->cells, cp->ncells);
	for (int i = 0; i < cp->ncells; i++)
	{
		if (n > 0 && cell_cmp(&cp->cells[n - 1], &cp->cells[i]) == 0)
		{
			BatchCell  *into = &cp->cells[n - 1];
			UsageCell	v = cell_value(&cp->cells[i]);

			into->c = cell_value(into);
			into->scale = -1;
			billing_cell_combine(by_rank[cp->cells[i].series]->meter->agg, &into->c, &v);
		}
		else
			cp->cells[n++] = cp->cells[i];
	}
	cp->ncells = n;
	MemoryContextSwitchTo(old);
	return by_rank;
}
