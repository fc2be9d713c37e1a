/*
 * ingest.c
 *		The SQL entry points of usage ingest: billing.record,
 *		billing.ingest and billing.report_cumulative (the metered-table
 *		triggers are in ingest_trigger.c), and the accumulator each of them
 *		fills.  See ingest.h for how ingest works and which file does what.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "ingest.h"

PG_FUNCTION_INFO_V1(billing_record);
PG_FUNCTION_INFO_V1(billing_ingest);
PG_FUNCTION_INFO_V1(billing_report_cumulative);

/* saved plans */
static SPIPlanPtr offset_plan = NULL;
static SPIPlanPtr cumulative_insert_plan = NULL;
static SPIPlanPtr cumulative_lock_plan = NULL;
static SPIPlanPtr cumulative_update_plan = NULL;

/*
 * The cell table and flush buffers of the last billing.ingest call, empty,
 * kept for the next call in spare_cxt (a child of TopMemoryContext while
 * kept): the table of a 10k-event batch is about 2 MB, and allocating it
 * afresh in every call costs more in page faults than the rest of the
 * counting.  A call takes them (spare_cxt becomes a child of its state, so
 * an error frees them with it) and gives them back when it ends well.
 */
static MemoryContext spare_cxt = NULL;
static bucket_hash *spare_cells = NULL;
static FlushBufs spare_flush;

/*
 * billing_ingest_create
 *		A new, empty accumulator in a child of parent, with room for ncells
 *		counter cells to start.  Each job's part of it starts empty and
 *		allocates in the accumulator's context; deleting that context
 *		frees all of it.
 */
IngestState *
billing_ingest_create(MemoryContext parent, uint32 ncells)
{
	MemoryContext ctx = AllocSetContextCreate(parent, "billing ingest",
											  ALLOCSET_DEFAULT_SIZES);
	IngestState *st = MemoryContextAllocZero(ctx, sizeof(IngestState));
	MemoryContext cells_cxt = AllocSetContextCreate(ctx, "billing ingest cells",
													ALLOCSET_DEFAULT_SIZES);

	st->ctx = ctx;
	billing_acc_init(&st->acc, ctx, cells_cxt, NULL, ncells);
	st->claims.cxt = ctx;
	st->flush.cxt = cells_cxt;
	st->known.cxt = ctx;
	st->runs.cxt = ctx;
	return st;
}

/*
 * ingest_create_spare
 *		billing_ingest_create for billing.ingest: the same, with the cell
 *		table and flush buffers the last call left, when there are.
 */
static IngestState *
ingest_create_spare(MemoryContext parent, uint32 ncells)
{
	MemoryContext ctx;
	IngestState *st;

	if (spare_cxt == NULL)
		return billing_ingest_create(parent, ncells);
	ctx = AllocSetContextCreate(parent, "billing ingest", ALLOCSET_DEFAULT_SIZES);
	st = MemoryContextAllocZero(ctx, sizeof(IngestState));
	st->ctx = ctx;
	MemoryContextSetParent(spare_cxt, ctx);
	Assert(spare_cells->members == 0);
	billing_acc_init(&st->acc, ctx, spare_cxt, spare_cells, 0);
	st->claims.cxt = ctx;
	st->flush = spare_flush;
	st->known.cxt = ctx;
	st->runs.cxt = ctx;
	spare_cxt = NULL;
	spare_cells = NULL;
	return st;
}

/*
 * ingest_keep_spare
 *		After the last flush of a billing.ingest call: keep its (empty) cell
 *		table and flush buffers for the next call, unless they outgrew
 *		work_mem.
 */
static void
ingest_keep_spare(IngestState *st)
{
	Size		budget = (Size) work_mem * 1024;

	if (spare_cxt != NULL || st->acc.buckets->members != 0 ||
		(Size) st->acc.buckets->size * sizeof(BucketAcc) > budget ||
		(Size) st->flush.cap * sizeof(BucketAcc) > budget)
		return;
	MemoryContextSetParent(st->acc.cells_cxt, TopMemoryContext);
	spare_cxt = st->acc.cells_cxt;
	spare_cells = st->acc.buckets;
	spare_flush = st->flush;
}

/*
 * require_args
 *		Raise 22004 for the first NULL among the leading arguments, named in
 *		order by names (NULL-terminated).
 */
static void
require_args(FunctionCallInfo fcinfo, const char *const *names)
{
	for (int n = 0; names[n] != NULL; n++)
		if (PG_ARGISNULL(n))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not be null", names[n])));
}

/*
 * billing.record(account_id, meter, quantity, ts, event_id, dimension)
 *		Count one usage report; false when event_id was already counted.
 */
Datum
billing_record(PG_FUNCTION_ARGS)
{
	IngestState *st;
	text	   *meter;
	text	   *event_id = NULL;
	text	   *dim = NULL;
	ReportResult r;
	MemoryContext callctx = CurrentMemoryContext;

	require_args(fcinfo, (const char *const[]) {"account_id", "meter", "quantity",
		"ts", NULL});
	meter = PG_GETARG_TEXT_PP(1);
	if (!PG_ARGISNULL(4))
		event_id = PG_GETARG_TEXT_PP(4);
	if (!PG_ARGISNULL(5))
		dim = PG_GETARG_TEXT_PP(5);

	st = billing_ingest_create(callctx, 8);
	r = billing_report(st, PG_GETARG_INT64(0),
					   VARDATA_ANY(meter), VARSIZE_ANY_EXHDR(meter),
					   PG_GETARG_DATUM(2), NUMERICOID, PG_GETARG_TIMESTAMPTZ(3),
					   event_id ? VARDATA_ANY(event_id) : NULL,
					   event_id ? VARSIZE_ANY_EXHDR(event_id) : 0,
					   dim ? VARDATA_ANY(dim) : "", dim ? VARSIZE_ANY_EXHDR(dim) : 0,
					   MODE_CLAIM_NOW);
	billing_flush(st);
	MemoryContextDelete(st->ctx);
	PG_RETURN_BOOL(r == REPORT_COUNTED);
}

/*
 * claim_offset
 *		Advance the stored offset of (source, partition) to batch_offset;
 *		false when it already is at or past it.  The row stays locked to the
 *		end of the transaction, so concurrent batches of one partition apply
 *		one at a time and each exactly once.
 */
static bool
claim_offset(text *source, int32 partition, int64 offset)
{
	static const char *sql =
		"INSERT INTO billing.ingest_offsets AS o (source, partition, last_offset) "
		"VALUES ($1, $2, $3) ON CONFLICT (source, partition) DO UPDATE "
		"SET last_offset = excluded.last_offset, applied_at = pg_catalog.now() "
		"WHERE o.last_offset OPERATOR(pg_catalog.<) excluded.last_offset";
	Datum		values[3];
	Oid			types[3] = {TEXTOID, INT4OID, INT8OID};
	bool		applied;
	int			ret;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	values[0] = PointerGetDatum(source);
	values[1] = Int32GetDatum(partition);
	values[2] = Int64GetDatum(offset);
	if (billing_distributed())
	{
		/*
		 * ingest_offsets is a reference table: Citus 13.2 crashes planning
		 * a generic plan of this upsert, so plan it with the values; and
		 * Citus takes only immutable functions in DO UPDATE SET, so now()
		 * comes in through the inserted row.
		 */
		ret = SPI_execute_with_args("INSERT INTO billing.ingest_offsets AS o "
									"(source, partition, last_offset, applied_at) "
									"VALUES ($1, $2, $3, pg_catalog.now()) "
									"ON CONFLICT (source, partition) DO UPDATE "
									"SET last_offset = excluded.last_offset, "
									"applied_at = excluded.applied_at "
									"WHERE o.last_offset OPERATOR(pg_catalog.<) excluded.last_offset",
									3, types, values, NULL, false, 0);
	}
	else
	{
		(void) billing_spi_plan(&offset_plan, sql, 3, types, CURSOR_OPT_GENERIC_PLAN);
		ret = SPI_execute_plan(offset_plan, values, NULL, false, 0);
	}
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not store the batch offset");
	applied = (SPI_processed == 1);
	SPI_finish();
	return applied;
}

/*
 * billing.ingest(source, partition, batch_offset, account_ids, meters,
 *				  quantities, ts, event_ids, dimensions)
 *		Apply a batch exactly once per (source, partition, batch_offset).
 */
Datum
billing_ingest(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum		out[3];
	bool		outnull[3] = {false, false, false};
	text	   *source;
	int32		partition;
	int64		offset;
	Datum	   *accts,
			   *meters,
			   *qtys,
			   *tss,
			   *ids = NULL,
			   *dims = NULL;
	bool	   *an,
			   *mn,
			   *qn,
			   *tn,
			   *idn = NULL,
			   *dn = NULL;
	int			n;
	IngestState *st;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);

	require_args(fcinfo, (const char *const[]) {"source", "partition", "batch_offset",
		"account_ids", "meters", "quantities", "ts", NULL});
	source = PG_GETARG_TEXT_PP(0);
	partition = PG_GETARG_INT32(1);
	offset = PG_GETARG_INT64(2);

	n = billing_array_elems(PG_GETARG_ARRAYTYPE_P(3), INT8OID, 8, true, TYPALIGN_DOUBLE,
					&accts, &an, -1, "account_ids", false);
	billing_array_elems(PG_GETARG_ARRAYTYPE_P(4), TEXTOID, -1, false, TYPALIGN_INT,
				&meters, &mn, n, "meters", false);
	billing_array_elems(PG_GETARG_ARRAYTYPE_P(5), NUMERICOID, -1, false, TYPALIGN_INT,
				&qtys, &qn, n, "quantities", false);
	billing_array_elems(PG_GETARG_ARRAYTYPE_P(6), TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE,
				&tss, &tn, n, "ts", false);
	if (!PG_ARGISNULL(7))
		billing_array_elems(PG_GETARG_ARRAYTYPE_P(7), TEXTOID, -1, false, TYPALIGN_INT,
					&ids, &idn, n, "event_ids", true);
	if (!PG_ARGISNULL(8))
		billing_array_elems(PG_GETARG_ARRAYTYPE_P(8), TEXTOID, -1, false, TYPALIGN_INT,
					&dims, &dn, n, "dimensions", true);

	if (!claim_offset(source, partition, offset))
	{
		out[0] = Int32GetDatum(0);
		out[1] = Int32GetDatum(0);
		out[2] = BoolGetDatum(true);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, out, outnull);
		return (Datum) 0;
	}

	st = ingest_create_spare(CurrentMemoryContext, Min(Max(n, 16), 1024));
	for (int i = 0; i < n; i++)
	{
		const char *m,
				   *e = NULL,
				   *d = "";
		int			ml,
					el = 0,
					dl = 0;

		billing_text_bytes(meters[i], &m, &ml);
		if (ids && !idn[i])
			billing_text_bytes(ids[i], &e, &el);
		if (dims && !dn[i])
			billing_text_bytes(dims[i], &d, &dl);
		billing_report(st, DatumGetInt64(accts[i]), m, ml, qtys[i], NUMERICOID,
					   DatumGetTimestampTz(tss[i]), e, el, d, dl, MODE_QUEUE);
		billing_flush_if_full(st);
	}
	billing_flush(st);

	out[0] = Int32GetDatum((int32) st->acc.counted);
	out[1] = Int32GetDatum((int32) st->claims.duplicates);
	out[2] = BoolGetDatum(false);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, out, outnull);
	ingest_keep_spare(st);
	MemoryContextDelete(st->ctx);
	return (Datum) 0;
}

/*
 * billing.report_cumulative(source, account_id, meter, bucket_start, total,
 *							 dimension)
 *		Record a collector's running total for a bucket; the bucket counts
 *		the sum over sources of each source's greatest total.
 */
Datum
billing_report_cumulative(PG_FUNCTION_ARGS)
{
	IngestState *st;
	text	   *source;
	int64		account_id;
	text	   *meter;
	TimestampTz ts;
	Numeric		total;
	text	   *dim;
	const char *dstr = "";
	int			dlen = 0;
	MeterSlot  *slot;
	TimestampTz bucket;
	Datum		values[6];
	Oid			types[6] = {INT8OID, TEXTOID, TEXTOID, TIMESTAMPTZOID, TEXTOID, NUMERICOID};
	bool		new_source;
	Numeric		old_total;
	Numeric		increase = NULL;
	bool		isnull;
	int			cmp;
	MemoryContext callctx = CurrentMemoryContext;

	require_args(fcinfo, (const char *const[]) {"source", "account_id", "meter",
		"bucket_start", "total", NULL});
	source = PG_GETARG_TEXT_PP(0);
	account_id = PG_GETARG_INT64(1);
	meter = PG_GETARG_TEXT_PP(2);
	ts = PG_GETARG_TIMESTAMPTZ(3);
	total = PG_GETARG_NUMERIC(4);
	if (!PG_ARGISNULL(5))
	{
		dim = PG_GETARG_TEXT_PP(5);
		billing_text_bytes(PointerGetDatum(dim), &dstr, &dlen);
	}

	st = billing_ingest_create(callctx, 8);
	slot = billing_acc_slot(&st->acc, VARDATA_ANY(meter), VARSIZE_ANY_EXHDR(meter));
	if (slot->def.agg != AGG_SUM)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("meter \"%s\" does not add quantities", slot->name),
				 errdetail("Cumulative totals can only be reported for meters with aggregation 'sum'.")));

	/* validates total, timestamp and account like any report */
	(void) billing_report(st, account_id, slot->name, strlen(slot->name),
						  NumericGetDatum(total), NUMERICOID, ts, NULL, 0,
						  dstr, dlen, MODE_CLAIM_NOW);
	billing_check_accounts(&account_id, 1);
	bucket = billing_bin_start(ts, slot->def.width);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	(void) billing_spi_plan(&cumulative_insert_plan, "INSERT INTO billing.cumulative_reports "
							"(account_id, meter, dimension, bucket_start, source, total) "
							"VALUES ($1, $2, $3, $4, $5, 0) ON CONFLICT DO NOTHING",
							5, types, CURSOR_OPT_GENERIC_PLAN);
	(void) billing_spi_plan(&cumulative_lock_plan, "SELECT total FROM billing.cumulative_reports "
							"WHERE account_id OPERATOR(pg_catalog.=) $1 "
							"AND meter OPERATOR(pg_catalog.=) $2 "
							"AND dimension OPERATOR(pg_catalog.=) $3 "
							"AND bucket_start OPERATOR(pg_catalog.=) $4 "
							"AND source OPERATOR(pg_catalog.=) $5 FOR UPDATE",
							5, types, CURSOR_OPT_GENERIC_PLAN);
	(void) billing_spi_plan(&cumulative_update_plan, "UPDATE billing.cumulative_reports SET total = $6 "
							"WHERE account_id OPERATOR(pg_catalog.=) $1 "
							"AND meter OPERATOR(pg_catalog.=) $2 "
							"AND dimension OPERATOR(pg_catalog.=) $3 "
							"AND bucket_start OPERATOR(pg_catalog.=) $4 "
							"AND source OPERATOR(pg_catalog.=) $5",
							6, types, CURSOR_OPT_GENERIC_PLAN);
	values[0] = Int64GetDatum(account_id);
	values[1] = PointerGetDatum(cstring_to_text(slot->name));
	values[2] = PointerGetDatum(cstring_to_text_with_len(dstr, dlen));
	values[3] = TimestampTzGetDatum(bucket);
	values[4] = PointerGetDatum(source);
	values[5] = NumericGetDatum(total);

	if (SPI_execute_plan(cumulative_insert_plan, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not record cumulative total");
	new_source = (SPI_processed == 1);
	if (SPI_execute_plan(cumulative_lock_plan, values, NULL, false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "could not lock cumulative total");

	/*
	 * old_total lives in SPI's memory (the row read, or its detoasted copy),
	 * which SPI_finish frees: everything derived from it is computed here,
	 * and the increase is kept in the caller's memory.
	 */
	old_total = DatumGetNumeric(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 1, &isnull));
	if (isnull)
		elog(ERROR, "cumulative total is null");
	cmp = DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(total),
											NumericGetDatum(old_total)));
	if (cmp > 0)
	{
		MemoryContext spictx = MemoryContextSwitchTo(callctx);

		increase = DatumGetNumeric(DirectFunctionCall2(numeric_sub, NumericGetDatum(total),
													   NumericGetDatum(old_total)));
		MemoryContextSwitchTo(spictx);
		if (SPI_execute_plan(cumulative_update_plan, values, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "could not update cumulative total");
	}
	old_total = NULL;
	SPI_finish();

	/* the accumulator holds the report; replace it by the increase */
	billing_acc_discard(&st->acc);
	if (cmp > 0 || new_source)
	{
		BucketKey	key;
		Qty			inc;
		bool		notfinite;
		BucketAcc  *cell;

		memset(&key, 0, sizeof(key));
		key.account_id = account_id;
		key.meter = slot->id;
		key.dim = billing_acc_dim(&st->acc, dstr, dlen);
		key.bucket_start = bucket;
		if (increase != NULL)
			billing_qty_from_datum(NumericGetDatum(increase), NUMERICOID, &inc, &notfinite);
		else
		{
			/* a new source whose first total is not above 0 */
			inc.isdec = true;
			inc.dec = 0;
			inc.num = NULL;
		}
		billing_acc_add(&st->acc, &key, &inc, ts, 0);
		billing_acc_settle(&st->acc);
		/* a source counts as one event, the first time it reports */
		cell = bucket_lookup(st->acc.buckets, key);
		cell->events = new_source ? 1 : 0;
		billing_flush(st);
	}
	MemoryContextDelete(st->ctx);
	PG_RETURN_VOID();
}
