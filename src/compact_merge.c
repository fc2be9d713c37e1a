/*
 * compact_merge.c
 *		The rows usage_days has already, merged with a batch's cells (step 3
 *		of compact.h).
 *
 * The rows of the batch's accounts and days are read through SPI, keyed by
 * (account, day, series rank), before any key is written.  Each (account,
 * series, day) of the batch then makes one row: the existing row's cells
 * decoded and merged with the batch's by bucket (cells of one bucket
 * combined), re-encoded (store.c), and the day's total combined with
 * theirs.  The row goes to the writer of compact_write.c: straight into
 * the heap on one node (an update in place of the old row, which is why
 * its ctid is read), or collected for the next upsert on Citus.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "compact.h"

/*
 * old_rows_of_day
 *		Read into rows the rows of usage_days (or the shard being compacted)
 *		of day day whose account and meter are among the given ones: one
 *		index scan with the two arrays as keys of the primary key (account,
 *		meter, day), so only that day's rows of those accounts are read.
 */
static void
old_rows_of_day(Compaction *cp, HTAB *rows, Datum *accounts, int naccounts, Datum *meters,
				int nmeters, TimestampTz day, MemoryContext cxt)
{
	Datum		args[3];
	Oid			types[3] = {INT8ARRAYOID, TEXTARRAYOID, TIMESTAMPTZOID};
	int			ret;
	StringInfoData sql;
	MemoryContext old = MemoryContextSwitchTo(cxt);

	args[0] = PointerGetDatum(construct_array(accounts, naccounts, INT8OID, 8, true,
											  TYPALIGN_DOUBLE));
	args[1] = PointerGetDatum(construct_array(meters, nmeters, TEXTOID, -1, false, TYPALIGN_INT));
	args[2] = TimestampTzGetDatum(day);
	MemoryContextSwitchTo(old);

	/*
	 * usage_days or the shard being compacted; not read-only: it must see
	 * the rows the earlier batches wrote
	 */
	initStringInfo(&sql);
	appendStringInfo(&sql, "SELECT account_id, meter::text, day, dimension::text, quantity, "
					 "events, last_ts, last_seq, cells, ctid FROM %s "
					 "WHERE account_id OPERATOR(pg_catalog.=) ANY ($1) "
					 "AND meter OPERATOR(pg_catalog.=) ANY ($2::text[] COLLATE \"C\") "
					 "AND day OPERATOR(pg_catalog.=) $3", cp->days_name);
	ret = SPI_execute_with_args(sql.data, 3, types, args, NULL, false, 0);
	pfree(sql.data);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading billing.usage_days failed: %s", SPI_result_code_string(ret));

	old = MemoryContextSwitchTo(cxt);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		Datum		v[10];
		bool		n[10];
		text	   *meter;
		text	   *dim;
		Series	   *ser;
		SeriesKey	key;
		char		tmp[SERIES_KEY_TMP];
		RowKey		rk;
		OldRow	   *row;
		bool		found;

		/* one pass over the row's columns (SPI_getbinval would walk them per column) */
		heap_deform_tuple(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, v, n);
		meter = DatumGetTextPP(v[1]);
		dim = DatumGetTextPP(v[3]);
		if (VARSIZE_ANY_EXHDR(meter) > 255)
			continue;
		key = billing_series_key(VARDATA_ANY(meter), VARSIZE_ANY_EXHDR(meter),
								 VARDATA_ANY(dim), VARSIZE_ANY_EXHDR(dim), tmp);
		ser = hash_search(cp->series_hash, &key, HASH_FIND, NULL);
		if (ser == NULL || ser->meter == NULL)
			continue;
		memset(&rk, 0, sizeof(rk));
		rk.account = DatumGetInt64(v[0]);
		rk.day = DatumGetTimestampTz(v[2]);
		rk.series = ser->rank;
		row = hash_search(rows, &rk, HASH_ENTER, &found);
		memset(&row->total, 0, sizeof(UsageCell));
		row->total.bucket = rk.day;
		row->total.num = DatumGetNumericCopy(v[4]);
		row->total.events = DatumGetInt64(v[5]);
		row->total.last_ts = n[6] ? AGG_NO_TS : DatumGetTimestampTz(v[6]);
		row->total.last_seq = n[7] ? AGG_NO_SEQ : DatumGetInt64(v[7]);
		row->cells = DatumGetByteaPCopy(v[8]);
		row->tid = *(ItemPointer) DatumGetPointer(v[9]);
	}
	MemoryContextSwitchTo(old);
	SPI_freetuptable(SPI_tuptable);
}

/* a key of the batch: its account, meter and day */
typedef struct DayKey
{
	TimestampTz day;
	int64		account;
	const CMeter *meter;
} DayKey;

/* order DayKeys by day, then account (the order the reads want) */
static int
daykey_cmp(const void *a, const void *b)
{
	const DayKey *x = (const DayKey *) a;
	const DayKey *y = (const DayKey *) b;

	if (x->day != y->day)
		return x->day < y->day ? -1 : 1;
	if (x->account != y->account)
		return x->account < y->account ? -1 : 1;
	return 0;
}

/*
 * billing_compact_old_rows
 *		The rows of usage_days (or the shard being compacted) that the keys
 *		of cells[from, to) have already, keyed by (account, day, series
 *		rank), in cxt.  They are read day by day, each day's by the accounts
 *		and meters that have cells that day (old_rows_of_day): a batch
 *		holding one late cell of an account reads that day's row, not every
 *		day between it and today.
 */
HTAB *
billing_compact_old_rows(Compaction *cp, Series **by_rank, int from, int to, MemoryContext cxt)
{
	HASHCTL		ctl;
	HTAB	   *rows;
	DayKey	   *keys;
	int			nkeys = 0;
	Datum	   *accounts;
	Datum	   *meters;
	const CMeter **seen;
	int			save_nestlevel;
	MemoryContext old = MemoryContextSwitchTo(cxt);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(RowKey);
	ctl.entrysize = sizeof(OldRow);
	ctl.hcxt = cxt;
	rows = hash_create("billing compaction rows", 1024, &ctl,
					   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	/* the keys (a run of cells each: sorted by account, series, bucket), by day */
	keys = palloc(Max(to - from, 1) * sizeof(DayKey));
	for (int i = from; i < to; i++)
	{
		const BatchCell *c = &cp->cells[i];
		TimestampTz day = STORE_DAY(c->c.bucket);

		if (i > from && c->account == c[-1].account && c->series == c[-1].series &&
			day == STORE_DAY(c[-1].c.bucket))
			continue;
		keys[nkeys].day = day;
		keys[nkeys].account = c->account;
		keys[nkeys].meter = by_rank[c->series]->meter;
		nkeys++;
	}
	qsort(keys, nkeys, sizeof(DayKey), daykey_cmp);
	accounts = palloc(Max(nkeys, 1) * sizeof(Datum));
	meters = palloc(Max(cp->nmeters, 1) * sizeof(Datum));
	seen = palloc(Max(cp->nmeters, 1) * sizeof(CMeter *));
	MemoryContextSwitchTo(old);

	/*
	 * the reads go by the primary key whatever the planner makes of the
	 * table's size and statistics (a sequential scan would read every day
	 * of every account): seqscans are off for them, as for a function with
	 * SET enable_seqscan = off
	 */
	save_nestlevel = NewGUCNestLevel();
	(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	for (int first = 0; first < nkeys;)
	{
		int			naccounts = 0,
					nmeters = 0,
					i;

		/* the accounts (sorted) and meters with cells that day */
		for (i = first; i < nkeys && keys[i].day == keys[first].day; i++)
		{
			int			k;

			if (naccounts == 0 || DatumGetInt64(accounts[naccounts - 1]) != keys[i].account)
				accounts[naccounts++] = Int64GetDatum(keys[i].account);
			for (k = 0; k < nmeters && seen[k] != keys[i].meter; k++)
				;
			if (k == nmeters)
			{
				seen[nmeters] = keys[i].meter;
				old = MemoryContextSwitchTo(cxt);
				meters[nmeters++] = PointerGetDatum(cstring_to_text_with_len(keys[i].meter->name,
																			  keys[i].meter->len));
				MemoryContextSwitchTo(old);
			}
		}
		old_rows_of_day(cp, rows, accounts, naccounts, meters, nmeters, keys[first].day, cxt);
		first = i;
	}
	AtEOXact_GUC(true, save_nestlevel);
	return rows;
}


/* append a batch cell to a packed value */
static inline void
store_batch_cell(StoreWriter *w, const BatchCell *b)
{
	if (b->scale >= 0 && b->scale <= STORE_MAX_SCALE)
		billing_store_add_fixed(w, &b->c, b->coef, b->scale);
	else
	{
		UsageCell	v = cell_value(b);

		billing_store_add(w, &v);
	}
}

/*
 * billing_compact_write_row
 *		Merge the cells new[0..n) (sorted, distinct buckets, one account,
 *		series and day) with the existing row old (or none) and queue the
 *		result for writing.
 */
void
billing_compact_write_row(Compaction *cp, const Series *ser, int64 account,
						  TimestampTz day, const BatchCell *new, int n, const OldRow *old,
						  StringInfo buf)
{
	Aggregation agg = ser->meter->agg;
	bool		is_last = agg == AGG_LAST;
	StoreWriter w;
	UsageCell	total;
	int			k;
	int			i = 0;
	MemoryContext keep = MemoryContextSwitchTo(cp->row_cxt);

	/* the numerics of the merge and of the total are temporary (row_cxt) */
	billing_store_begin(&w, buf, is_last, day);
	if (old != NULL)
	{
		StoreReader r;
		UsageCell	oc;
		bool		have;

		total = old->total;
		billing_store_open(&r, VARDATA_ANY(old->cells), VARSIZE_ANY_EXHDR(old->cells), day);
		have = billing_store_next(&r, &oc);
		while (have || i < n)
		{
			if (have && (i >= n || oc.bucket < new[i].c.bucket))
			{
				billing_store_add(&w, &oc);
				have = billing_store_next(&r, &oc);
			}
			else if (have && oc.bucket == new[i].c.bucket)
			{
				UsageCell	v = cell_value(&new[i]);

				billing_cell_combine(agg, &oc, &v);
				billing_store_add(&w, &oc);
				i++;
				have = billing_store_next(&r, &oc);
			}
			else
			{
				store_batch_cell(&w, &new[i]);
				i++;
			}
		}
		k = 0;
	}
	else
	{
		total = cell_value(&new[0]);
		for (int j = 0; j < n; j++)
			store_batch_cell(&w, &new[j]);
		k = 1;
	}
	for (; k < n; k++)
	{
		UsageCell	v = cell_value(&new[k]);

		billing_cell_combine(agg, &total, &v);
	}
	/* what is written lives in the batch's context */
	MemoryContextSwitchTo(keep);
	billing_cell_keep(&total, cp->batch_cxt);
	MemoryContextReset(cp->row_cxt);

	if (cp->heap != NULL)
	{
		Datum		values[STORE_NATTS];
		bool		nulls[STORE_NATTS] = {false};

		values[0] = Int64GetDatum(account);
		values[1] = PointerGetDatum(cstring_to_text_with_len(ser->meter->name, ser->meter->len));
		values[2] = TimestampTzGetDatum(day);
		values[3] = PointerGetDatum(cstring_to_text_with_len(ser->dim, ser->dimlen));
		values[4] = NumericGetDatum(total.num);
		values[5] = Int64GetDatum(total.events);
		values[6] = TimestampTzGetDatum(total.last_ts);
		nulls[6] = total.last_ts == AGG_NO_TS;
		values[7] = Int64GetDatum(total.last_seq);
		nulls[7] = total.last_seq == AGG_NO_SEQ;
		values[8] = PointerGetDatum(billing_store_end(&w));
		billing_compact_heap_write(cp->heap, values, nulls, old);
		return;
	}
	if (cp->nout == WRITE_CHUNK)
		billing_compact_out_flush(cp);
	k = cp->nout++;
	cp->o_account[k] = Int64GetDatum(account);
	cp->o_meter[k] = PointerGetDatum(cstring_to_text_with_len(ser->meter->name, ser->meter->len));
	cp->o_day[k] = TimestampTzGetDatum(day);
	cp->o_dim[k] = PointerGetDatum(cstring_to_text_with_len(ser->dim, ser->dimlen));
	cp->o_qty[k] = NumericGetDatum(total.num);
	cp->o_events[k] = Int64GetDatum(total.events);
	cp->o_ts[k] = TimestampTzGetDatum(total.last_ts);
	cp->o_ts_null[k] = total.last_ts == AGG_NO_TS;
	cp->o_seq[k] = Int64GetDatum(total.last_seq);
	cp->o_seq_null[k] = total.last_seq == AGG_NO_SEQ;
	cp->o_cells[k] = PointerGetDatum(billing_store_end(&w));
}
