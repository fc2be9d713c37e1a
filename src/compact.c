/*
 * compact.c
 *		billing.compact_usage(): folds the appended usage deltas into the
 *		packed store billing.usage_days; how is told in compact.h.
 *
 * This file holds the SQL entry point and the batch driver.  The entry
 * point takes the advisory lock (one compaction at a time), loads the
 * meters, makes the memory contexts (the batch's, one row's, the batch's
 * cell array) and chooses the writer: straight into the heap on one node,
 * SQL on Citus.  The deltas are then taken out batch by batch
 * (compact_deltas.c), each batch folded by billing_compact_fold: sorted and
 * combined (compact_sort.c), merged with the rows usage_days has already
 * (compact_merge.c), written (compact_write.c), and the cells of unique
 * meters handed to billing._unique_fold per account.
 */
#include "postgres.h"

#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "catalog.h"
#include "compact.h"
#include "util.h"

PG_FUNCTION_INFO_V1(billing_compact_usage);

/*
 * load_meters
 *		Every meter and its aggregation, sorted by name bytes.
 */
static void
load_meters(Compaction *cp, MemoryContext cxt)
{
	int			ret;

	ret = SPI_execute("SELECT meter::text, aggregation::text FROM billing.meters "
					  "ORDER BY meter COLLATE \"C\"", true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading billing.meters failed: %s", SPI_result_code_string(ret));
	cp->nmeters = (int) SPI_processed;
	cp->meters = MemoryContextAllocZero(cxt, Max(cp->nmeters, 1) * sizeof(CMeter));
	for (int i = 0; i < cp->nmeters; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *name = SPI_getvalue(tup, desc, 1);
		char	   *agg = SPI_getvalue(tup, desc, 2);

		cp->meters[i].name = MemoryContextStrdup(cxt, name);
		cp->meters[i].len = strlen(name);
		cp->meters[i].agg = billing_aggregation(agg);
		cp->meters[i].is_unique = strcmp(agg, "unique") == 0;
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * fold_unique
 *		Hand the cells of unique meters of one account, cells[0..n), to
 *		billing._unique_fold.
 */
static void
fold_unique(Compaction *cp, Series **by_rank, const BatchCell *cells, int n)
{
	Datum	   *meters = palloc(n * sizeof(Datum));
	Datum	   *dims = palloc(n * sizeof(Datum));
	Datum	   *buckets = palloc(n * sizeof(Datum));
	int			m = 0;
	Datum		args[4];
	Oid			types[4] = {INT8OID, TEXTARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID};
	int			ret;

	for (int i = 0; i < n; i++)
	{
		const Series *ser = by_rank[cells[i].series];

		if (!ser->meter->is_unique)
			continue;
		meters[m] = PointerGetDatum(cstring_to_text_with_len(ser->meter->name, ser->meter->len));
		dims[m] = PointerGetDatum(cstring_to_text_with_len(ser->dim, ser->dimlen));
		buckets[m] = TimestampTzGetDatum(cells[i].c.bucket);
		m++;
	}
	if (m == 0)
		return;
	args[0] = Int64GetDatum(cells[0].account);
	args[1] = billing_compact_array(meters, NULL, m, TEXTOID, -1, false, TYPALIGN_INT);
	args[2] = billing_compact_array(dims, NULL, m, TEXTOID, -1, false, TYPALIGN_INT);
	args[3] = billing_compact_array(buckets, NULL, m, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE);
	ret = SPI_execute_with_args("SELECT billing._unique_fold($1, $2, $3, $4)",
								4, types, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "billing._unique_fold failed: %s", SPI_result_code_string(ret));
	SPI_freetuptable(SPI_tuptable);
}

/*
 * billing_compact_fold
 *		Fold the batch's cells into usage_days (steps 2 to 4 of compact.h).
 */
void
billing_compact_fold(Compaction *cp)
{
	Series	  **by_rank;
	HTAB	   *old_rows;
	bool		any_unique = false;
	StringInfoData buf;
	MemoryContext old;

	if (cp->ncells == 0)
		return;

	/* series ranked by (meter, dimension); cells sorted and combined */
	by_rank = billing_compact_sort(cp, &any_unique);

	/* the rows the batch's keys have already */
	old_rows = billing_compact_old_rows(cp, by_rank);

	/* one row per (account, series, day) */
	old = MemoryContextSwitchTo(cp->batch_cxt);
	billing_compact_out_reserve(cp, WRITE_CHUNK);
	initStringInfo(&buf);
	for (int i = 0; i < cp->ncells;)
	{
		const BatchCell *first = &cp->cells[i];
		TimestampTz day = STORE_DAY(first->c.bucket);
		int			j = i + 1;
		RowKey		rk;

		CHECK_FOR_INTERRUPTS();
		while (j < cp->ncells && cp->cells[j].account == first->account &&
			   cp->cells[j].series == first->series &&
			   STORE_DAY(cp->cells[j].c.bucket) == day)
			j++;
		memset(&rk, 0, sizeof(rk));
		rk.account = first->account;
		rk.day = day;
		rk.series = first->series;
		billing_compact_write_row(cp, by_rank[first->series], first->account, day, first,
								  j - i, hash_search(old_rows, &rk, HASH_FIND, NULL), &buf);
		i = j;
	}
	MemoryContextSwitchTo(old);
	if (cp->heap != NULL)
		billing_compact_heap_flush(cp->heap);
	else
		billing_compact_out_flush(cp);

	/* unique meters: per account */
	if (any_unique)
	{
		for (int i = 0; i < cp->ncells;)
		{
			int			j = i + 1;

			while (j < cp->ncells && cp->cells[j].account == cp->cells[i].account)
				j++;
			old = MemoryContextSwitchTo(cp->batch_cxt);
			fold_unique(cp, by_rank, &cp->cells[i], j - i);
			MemoryContextSwitchTo(old);
			i = j;
		}
	}
}

/*
 * billing_compact_usage
 *		billing.compact_usage(): see compact.h.
 */
Datum
billing_compact_usage(PG_FUNCTION_ARGS)
{
	Compaction	cp;
	MemoryContext cxt = CurrentMemoryContext;
	int			ret;

	memset(&cp, 0, sizeof(cp));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/* one compaction at a time; concurrent ingest goes on (it only appends) */
	ret = SPI_execute("SELECT pg_catalog.pg_advisory_xact_lock(1651074162, 1)", false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "pg_advisory_xact_lock failed: %s", SPI_result_code_string(ret));
	load_meters(&cp, cxt);
	cp.batch_cxt = AllocSetContextCreate(cxt, "billing compaction batch",
										 ALLOCSET_DEFAULT_SIZES);
	cp.row_cxt = AllocSetContextCreate(cxt, "billing compaction row",
									   ALLOCSET_DEFAULT_SIZES);
	cp.cells_cxt = AllocSetContextCreate(cxt, "billing compaction cells",
										 ALLOCSET_DEFAULT_SIZES);
	cp.limit = (Size) maintenance_work_mem * 1024;
	billing_compact_begin(&cp);
	/* one node: usage_days is written straight into its heap and index */
	if (!billing_distributed())
		cp.heap = billing_compact_heap_begin();

	if (cp.heap != NULL)
		billing_compact_take_heap(&cp);
	else
		billing_compact_take_sql(&cp);
	billing_compact_fold(&cp);
	if (cp.heap != NULL)
		billing_compact_heap_end(cp.heap);
	MemoryContextDelete(cp.batch_cxt);
	MemoryContextDelete(cp.row_cxt);
	MemoryContextDelete(cp.cells_cxt);
	SPI_finish();
	PG_RETURN_INT64(cp.folded);
}
