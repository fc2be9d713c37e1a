/*
 * totals.c
 *		The compacted part of the usage totals of many billing periods, read
 *		straight from the primary-key index of the packed store
 *		billing.usage_days (see store.h).
 *
 * billing._rollup_totals(accounts bigint[], starts timestamptz[],
 * ends timestamptz[], meters text[], aggregations text[]) covers each
 * period [start, end) of an account with its whole UTC days, read from the
 * day totals of usage_days, and the cells of the days at its edges, decoded
 * from those days' packed cells:
 *
 *		[ps, pe) = cells of day fd in [ps, d0) + days [d0, d1)
 *				 + cells of day d1 in [d1, pe)
 *
 * with d0/d1 the first/last whole UTC day inside the period and fd the day
 * holding ps (the same split as billing._usage_totals_citus).  Each piece
 * of each meter is one range of the primary key (account_id, meter, day,
 * dimension), so an account's long history is never read.  Per period and
 * meter with cells it returns the meter's aggregate, folded by the one
 * rule of agg.c (billing_cell_combine), with the last_ts and last_seq of a
 * last meter's value.
 *
 * Matrix charges (issue 18): with the optional arrays s_idx, s_meters and
 * s_dims, the cells of a dimension named for a period and meter (a charge
 * of the period's plan rates that dimension alone) are totalled apart, one
 * row each with the dimension in a sixth column, and the meter's other
 * cells make the row whose dimension is NULL.  Without them (the 1.0
 * declaration: five arguments, five columns) every cell of a meter makes
 * one row.
 *
 * From 1.1 on, the cells not yet compacted are folded in as well: the
 * delta rows of each period's account (billing.usage_deltas, found through
 * its index on account_id, never by reading the table) are decoded once
 * per period, and their cells in [ps, pe) join the same aggregates by the
 * same rule, with a last meter's cell taking its row's seq as last_seq.
 * The totals are then complete: a preview's cost follows its account's
 * backlog, not the whole backlog of every account, whatever plan the
 * planner would have chosen from the table's statistics.
 *
 * Rating a month for 10,000 accounts reads about 300,000 day totals and
 * decodes no cell when the periods start at midnight UTC.
 *
 * A database still at 1.0 (billing.so serves every installed version) has
 * no usage_days: there the function reads 1.0's tables, minute buckets at
 * the edges (usage_buckets), then whole hours (usage_hourly) and whole
 * days (usage_daily).
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/relscan.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "common/int.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "executor/tuptable.h"
#include "nodes/primnodes.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/relcache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "agg.h"
#include "catalog.h"
#include "cells.h"
#include "decimal.h"
#include "store.h"
#include "util.h"

PG_FUNCTION_INFO_V1(billing_rollup_totals);

/* the open store and its primary key */
typedef struct CellTable
{
	Relation	heap;
	Relation	index;
	IndexScanDesc scan;
	TupleTableSlot *slot;
	AttrNumber	att_quantity;
	AttrNumber	att_last_ts;
	AttrNumber	att_last_seq;
	AttrNumber	att_dimension;
	AttrNumber	att_cells;
} CellTable;

/* the deltas not yet compacted and their index on account_id */
typedef struct DeltaTable
{
	Relation	heap;
	Relation	index;
	IndexScanDesc scan;
	TupleTableSlot *slot;
	AttrNumber	att_seq;
	AttrNumber	att_cells;
	bool		spans;			/* the index keeps each row's account range */
} DeltaTable;

/* the aggregate of one meter over one period: a cell folded by agg.c */
typedef struct MeterTotal
{
	bool		any;			/* a cell was folded in */
	UsageCell	acc;
} MeterTotal;

/* the number of column name of rel */
static AttrNumber
column_number(Relation rel, const char *name)
{
	AttrNumber	att = get_attnum(RelationGetRelid(rel), name);

	if (att == InvalidAttrNumber)
		elog(ERROR, "column %s of %s does not exist", name, RelationGetRelationName(rel));
	return att;
}

/*
 * open_table
 *		Open the store billing.<name> and its primary key, checked to begin
 *		(account_id, meter, <key>), for index scans (key: day for
 *		usage_days, bucket_start for the tables of a 1.0 install).
 */
static void
open_table(CellTable *t, const char *name, const char *key, Snapshot snapshot)
{
	Oid			pkey;

	t->heap = table_open(billing_relid(name), AccessShareLock);
	pkey = RelationGetPrimaryKeyIndex(t->heap);
	if (!OidIsValid(pkey))
		elog(ERROR, "billing.%s has no primary key", name);
	t->index = index_open(pkey, AccessShareLock);
	/* the key this file scans: (account_id, meter, day, ...) */
	if (t->index->rd_index->indnkeyatts < 3 ||
		t->index->rd_index->indkey.values[0] != column_number(t->heap, "account_id") ||
		t->index->rd_index->indkey.values[1] != column_number(t->heap, "meter") ||
		t->index->rd_index->indkey.values[2] != column_number(t->heap, key))
		elog(ERROR, "the primary key of billing.%s is not (account_id, meter, %s, ...)",
			 name, key);
	t->att_quantity = column_number(t->heap, "quantity");
	t->att_last_ts = column_number(t->heap, "last_ts");
	t->att_last_seq = column_number(t->heap, "last_seq");
	t->att_dimension = column_number(t->heap, "dimension");
	t->att_cells = strcmp(key, "day") == 0 ? column_number(t->heap, "cells") : InvalidAttrNumber;
	t->slot = table_slot_create(t->heap, NULL);
	t->scan = index_beginscan(t->heap, t->index, snapshot, 4, 0);
}

/* end an index scan of heap through index, and close both */
static void
close_scan(Relation heap, Relation index, IndexScanDesc scan, TupleTableSlot *slot)
{
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	index_close(index, AccessShareLock);
	table_close(heap, AccessShareLock);
}

/* close what open_table opened */
static void
close_table(CellTable *t)
{
	close_scan(t->heap, t->index, t->scan, t->slot);
}

/* is expression e a call of billing.<name>(account_id, cells)? */
static bool
is_span_call(Node *e, const char *name, Oid nsp, AttrNumber account, AttrNumber cells)
{
	FuncExpr   *f = (FuncExpr *) e;
	char	   *fname;
	bool		ok;

	if (!IsA(e, FuncExpr) || list_length(f->args) != 2 ||
		!IsA(linitial(f->args), Var) || ((Var *) linitial(f->args))->varattno != account ||
		!IsA(lsecond(f->args), Var) || ((Var *) lsecond(f->args))->varattno != cells ||
		get_func_namespace(f->funcid) != nsp)
		return false;
	fname = get_func_name(f->funcid);
	ok = fname != NULL && strcmp(fname, name) == 0;
	if (fname)
		pfree(fname);
	return ok;
}

/*
 * open_deltas
 *		Open billing.usage_deltas and its index on account_id, checked to
 *		begin with account_id, for index scans.  When the index is 1.1's,
 *		(account_id, _delta_first(account_id, cells), _delta_last(account_id,
 *		cells)), t->spans is set: a scan for one account then also bounds
 *		the rows' account range, and skips in the index the group rows of
 *		the account's block that cannot hold it.  (A 1.0 install served by
 *		this library has the index on account_id alone.)
 */
static void
open_deltas(DeltaTable *t, Snapshot snapshot)
{
	Form_pg_index ix;
	AttrNumber	att_account;

	t->heap = table_open(billing_relid("usage_deltas"), AccessShareLock);
	t->index = index_open(billing_relid("usage_deltas_account"), AccessShareLock);
	ix = t->index->rd_index;
	att_account = column_number(t->heap, "account_id");
	if (ix->indrelid != RelationGetRelid(t->heap) || ix->indnkeyatts < 1 ||
		ix->indkey.values[0] != att_account)
		elog(ERROR, "billing.usage_deltas_account is not an index of usage_deltas on (account_id, ...)");
	t->att_seq = column_number(t->heap, "seq");
	t->att_cells = column_number(t->heap, "cells");
	t->spans = false;
	if (ix->indnkeyatts == 3 && ix->indkey.values[1] == 0 && ix->indkey.values[2] == 0)
	{
		List	   *exprs = RelationGetIndexExpressions(t->index);
		Oid			nsp = RelationGetNamespace(t->heap);

		t->spans = list_length(exprs) == 2 &&
			is_span_call(linitial(exprs), "_delta_first", nsp, att_account, t->att_cells) &&
			is_span_call(lsecond(exprs), "_delta_last", nsp, att_account, t->att_cells);
		list_free_deep(exprs);
	}
	t->slot = table_slot_create(t->heap, NULL);
	t->scan = index_beginscan(t->heap, t->index, snapshot, t->spans ? 3 : 1, 0);
}

/* close what open_deltas opened */
static void
close_deltas(DeltaTable *t)
{
	close_scan(t->heap, t->index, t->scan, t->slot);
}

/*
 * fold_cell
 *		Fold cell v into a meter's aggregate by the one rule of agg.c
 *		(billing_cell_combine): the first cell becomes the aggregate.  A
 *		numeric result is made in the current memory context; the
 *		aggregate may also take v's quantity itself (the first cell, max,
 *		last), which the caller keeps if it must outlive v.
 */
static inline void
fold_cell(MeterTotal *m, Aggregation kind, const UsageCell *v)
{
	if (!m->any)
	{
		m->any = true;
		m->acc = *v;
	}
	else
		billing_cell_combine(kind, &m->acc, v);
}

/*
 * add_cell
 *		Fold one cell into a meter's aggregate by the one rule of agg.c
 *		(billing_cell_combine), in the current memory context (the
 *		aggregate's: quantities taken from the cell are copied there).
 */
static void
add_cell(MeterTotal *m, Aggregation kind, Datum q, TimestampTz ts, bool ts_null, int64 seq,
		 bool seq_null)
{
	UsageCell	v;

	memset(&v, 0, sizeof(v));
	billing_cell_set_numeric(&v, (Numeric) PG_DETOAST_DATUM_COPY(q));
	v.last_ts = ts_null ? AGG_NO_TS : ts;
	v.last_seq = seq_null ? AGG_NO_SEQ : seq;
	fold_cell(m, kind, &v);
}

/* are two text datums the same string (byte for byte, as COLLATE "C")? */
static bool
text_equal(Datum a, Datum b)
{
	text	   *ta = DatumGetTextPP(a);
	text	   *tb = DatumGetTextPP(b);

	return VARSIZE_ANY_EXHDR(ta) == VARSIZE_ANY_EXHDR(tb) &&
		memcmp(VARDATA_ANY(ta), VARDATA_ANY(tb), VARSIZE_ANY_EXHDR(ta)) == 0;
}

/* fold the cell with quantity coef / 10^scale and events events into m */
static void
fold_fixed(MeterTotal *m, Aggregation kind, int128_t coef, int scale, int64 events)
{
	UsageCell	v;

	memset(&v, 0, sizeof(v));
	v.num = billing_store_numeric(coef, scale);
	v.events = events;
	v.last_ts = AGG_NO_TS;
	v.last_seq = AGG_NO_SEQ;
	fold_cell(m, kind, &v);
}

/*
 * sum_cells
 *		Fold the cells of a sum or count meter read by r whose bucket is in
 *		[lo, hi) into m: their quantities are added as the integers they are
 *		written as (at the largest display scale met), and folded into m as
 *		one numeric, which numeric addition of every cell would have given
 *		too (the sum has the largest display scale of its terms).  A
 *		quantity written as text, or a sum about to leave the 38 digits, is
 *		folded by the numeric rule of agg.c.
 */
static void
sum_cells(StoreReader *r, TimestampTz lo, TimestampTz hi, Aggregation kind, MeterTotal *m)
{
	int128_t	limit = billing_dec_pow10[DEC_MAX_DIGITS];
	int128_t	acc = 0;
	int			acc_scale = -1;	/* -1: nothing added yet */
	int64		events = 0;
	UsageCell	c;
	int128_t	coef;
	int			scale;

	while (billing_store_next_fixed(r, &c, &coef, &scale))
	{
		int128_t	sum;
		int64		ev;

		if (c.bucket >= hi)
			break;				/* the cells come in increasing bucket order */
		if (c.bucket < lo)
			continue;
		if (scale < 0)
		{
			/* a quantity too large for the integers */
			c.last_ts = AGG_NO_TS;
			c.last_seq = AGG_NO_SEQ;
			fold_cell(m, kind, &c);
			continue;
		}
		if (acc_scale >= 0)
		{
			/* both at the larger scale; on overflow fold what was added */
			while (acc_scale < scale && acc > -limit / 10 && acc < limit / 10)
			{
				acc *= 10;
				acc_scale++;
			}
			while (scale < acc_scale && coef > -limit / 10 && coef < limit / 10)
			{
				coef *= 10;
				scale++;
			}
			sum = acc + coef;
			if (scale == acc_scale && sum > -limit && sum < limit &&
				!pg_add_s64_overflow(events, c.events, &ev))
			{
				acc = sum;
				events = ev;
				continue;
			}
			fold_fixed(m, kind, acc, acc_scale, events);
		}
		acc = coef;
		acc_scale = scale;
		events = c.events;
	}
	if (acc_scale >= 0)
		fold_fixed(m, kind, acc, acc_scale, events);
}

/*
 * fold the rows of one account and meter whose day is in [lo, hi) into
 * tots: with cells_lo < cells_hi, the cells of those rows whose bucket is
 * in [cells_lo, cells_hi) (a day at a period's edge), else the rows' day
 * totals.  tots[0] takes the rows of dimensions not in named, tots[1 + j]
 * those of named[j] (nnamed = 0: every row goes to tots[0]).  The
 * aggregate's memory comes from cxt (the scan itself allocates in the
 * caller's context, which lives as long as the scan: btree keeps memory it
 * allocates while scanning until the scan ends)
 */
static void
scan_range(CellTable *t, int64 account, Datum meter, TimestampTz lo, TimestampTz hi,
		   TimestampTz cells_lo, TimestampTz cells_hi,
		   Aggregation kind, const Datum *named, int nnamed, MeterTotal *tots,
		   MemoryContext cxt)
{
	ScanKeyData keys[4];
	bool		partial = cells_lo < cells_hi;

	if (lo >= hi)
		return;
	ScanKeyInit(&keys[0], 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(account));
	ScanKeyInit(&keys[1], 2, BTEqualStrategyNumber, F_TEXTEQ, meter);
	ScanKeyInit(&keys[2], 3, BTGreaterEqualStrategyNumber, F_TIMESTAMP_GE,
				TimestampTzGetDatum(lo));
	ScanKeyInit(&keys[3], 3, BTLessStrategyNumber, F_TIMESTAMP_LT, TimestampTzGetDatum(hi));
	index_rescan(t->scan, keys, 4, NULL, 0);
	while (index_getnext_slot(t->scan, ForwardScanDirection, t->slot))
	{
		bool		null_q,
					null_ts = true,
					null_seq = true;
		Datum		q;
		Datum		ts = 0,
					seq = 0;
		MeterTotal *m = &tots[0];
		MemoryContext old;

		CHECK_FOR_INTERRUPTS();
		if (nnamed > 0)
		{
			bool		null_dim;
			Datum		dim = slot_getattr(t->slot, t->att_dimension, &null_dim);

			for (int j = 0; !null_dim && j < nnamed; j++)
				if (text_equal(dim, named[j]))
				{
					m = &tots[1 + j];
					break;
				}
		}
		if (partial)
		{
			bool		null_cells;
			Datum		cells = slot_getattr(t->slot, t->att_cells, &null_cells);
			StoreReader r;
			UsageCell	c;
			bytea	   *b;

			if (null_cells)
				continue;
			old = MemoryContextSwitchTo(cxt);
			b = DatumGetByteaPP(cells);
			billing_store_open(&r, VARDATA_ANY(b), VARSIZE_ANY_EXHDR(b), lo);
			if (kind == AGG_SUM || kind == AGG_COUNT)
				sum_cells(&r, cells_lo, cells_hi, kind, m);
			else
				while (billing_store_next(&r, &c))
				{
					if (c.bucket >= cells_hi)
						break;	/* the cells come in increasing bucket order */
					if (c.bucket < cells_lo)
						continue;
					fold_cell(m, kind, &c);
				}
			MemoryContextSwitchTo(old);
			continue;
		}
		q = slot_getattr(t->slot, t->att_quantity, &null_q);
		if (null_q)
			continue;
		if (kind == AGG_LAST)
		{
			ts = slot_getattr(t->slot, t->att_last_ts, &null_ts);
			seq = slot_getattr(t->slot, t->att_last_seq, &null_seq);
		}
		old = MemoryContextSwitchTo(cxt);
		add_cell(m, kind, q, null_ts ? 0 : DatumGetTimestampTz(ts), null_ts,
				 null_seq ? 0 : DatumGetInt64(seq), null_seq);
		MemoryContextSwitchTo(old);
	}
}

/* the totals of one period: meter k's are tots[first[k] .. first[k] + 1 + nnamed[k]) */
typedef struct PeriodTotals
{
	int			n_meter;
	const Datum *meters;
	const Aggregation *kinds;
	int		   *first;			/* per meter: its aggregates in tots, its names in named */
	int		   *nnamed;			/* per meter: the dimensions named for it */
	MeterTotal *tots;			/* per meter: the rest, then each named dimension */
	Datum	   *named;			/* named[first[k] - k + j]: meter k's j-th name */
} PeriodTotals;

/* does text datum t hold the n bytes at p? */
static bool
text_is(Datum t, const char *p, int n)
{
	text	   *tt = DatumGetTextPP(t);

	return VARSIZE_ANY_EXHDR(tt) == n && memcmp(VARDATA_ANY(tt), p, n) == 0;
}

/*
 * keep_totals
 *		Copy every aggregate of the period into cxt (the quantities the
 *		folding allocated elsewhere, which the caller then frees).
 */
static void
keep_totals(PeriodTotals *pt, MemoryContext cxt)
{
	for (int k = 0; k < pt->n_meter; k++)
		for (int j = 0; j <= pt->nnamed[k]; j++)
			if (pt->tots[pt->first[k] + j].any)
				billing_cell_keep(&pt->tots[pt->first[k] + j].acc, cxt);
}

/*
 * fold_cells
 *		Fold the cells r reads (one account's part seg of a delta row)
 *		whose bucket is in [ps, pe) into the period's
 *		aggregates, in *cxt; cells of meters not in the list (unique
 *		meters) are skipped.  Returns the cells folded.
 */
static int
fold_cells(CellReader *r, const DeltaSegment *seg, TimestampTz ps, TimestampTz pe,
		   PeriodTotals *pt, MemoryContext cxt)
{
	CellSeries	s;
	int			folded = 0;

	while (billing_cells_next_series(r, &s))
	{
		int			k;
		MeterTotal *m = NULL;

		for (k = 0; k < pt->n_meter; k++)
			if (text_is(pt->meters[k], s.meter, s.meterlen))
				break;
		if (k < pt->n_meter)
		{
			const Datum *names = &pt->named[pt->first[k] - k];

			m = &pt->tots[pt->first[k]];
			for (int j = 0; j < pt->nnamed[k]; j++)
				if (text_is(names[j], s.dim, s.dimlen))
				{
					m = &pt->tots[pt->first[k] + 1 + j];
					break;
				}
		}
		for (uint32 i = 0; i < s.ncells; i++)
		{
			Cell		c;
			UsageCell	v;
			MemoryContext old;

			billing_cells_next(r, &s, &c);
			if (m == NULL || c.bucket_start < ps || c.bucket_start >= pe)
				continue;
			memset(&v, 0, sizeof(v));
			v.bucket = c.bucket_start;
			v.events = c.events;
			/* the numeric billing._delta_cells gives: the same display scale */
			v.num = c.isdec ? billing_dec_to_numeric(c.dec, CELLS_QTY_SCALE) : c.num;
			v.last_ts = s.is_last ? c.last_ts : AGG_NO_TS;
			v.last_seq = (s.is_last && seg->has_seq) ? seg->seq : AGG_NO_SEQ;
			old = MemoryContextSwitchTo(cxt);
			fold_cell(m, pt->kinds[k], &v);
			/* the first cell, max and last may take v's quantity itself */
			if (m->acc.num == v.num)
				billing_cell_keep(&m->acc, cxt);
			MemoryContextSwitchTo(old);
			folded++;
		}
	}
	return folded;
}

/*
 * fold_deltas
 *		Fold the cells of account's delta rows (billing.usage_deltas: not yet
 *		compacted; its own rows, and its part of the group rows of its
 *		block) whose bucket is in [ps, pe) into the period's aggregates,
 *		each by its meter's rule.  A last meter's cell has its part's seq
 *		as last_seq (NULL: unknown).  The aggregates live in *cxt; every few
 *		thousand cells they are copied into *spare and *cxt is emptied (the
 *		two swap), so a hot account's long backlog folds in bounded memory.
 */
static void
fold_deltas(DeltaTable *t, int64 account, TimestampTz ps, TimestampTz pe, PeriodTotals *pt,
			MemoryContext *cxt, MemoryContext *spare, MemoryContext row_cxt)
{
	int64		keys[2] = {account, billing_delta_group(account)};
	int			folded = 0;

	for (int ki = 0; ki < (keys[1] == keys[0] ? 1 : 2); ki++)
	{
		ScanKeyData key[3];

		/* the rows under the key that may hold the account: first <= it <= last */
		ScanKeyInit(&key[0], 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(keys[ki]));
		ScanKeyInit(&key[1], 2, BTLessEqualStrategyNumber, F_INT8LE, Int64GetDatum(account));
		ScanKeyInit(&key[2], 3, BTGreaterEqualStrategyNumber, F_INT8GE, Int64GetDatum(account));
		index_rescan(t->scan, key, t->spans ? 3 : 1, NULL, 0);
		while (index_getnext_slot(t->scan, ForwardScanDirection, t->slot))
		{
			bool		null_cells,
						null_seq;
			Datum		cells = slot_getattr(t->slot, t->att_cells, &null_cells);
			Datum		seq = slot_getattr(t->slot, t->att_seq, &null_seq);
			MemoryContext old;
			DeltaSegments segs;
			DeltaSegment seg;
			CellReader	r;
			bytea	   *b;

			CHECK_FOR_INTERRUPTS();
			if (null_cells)
				continue;
			old = MemoryContextSwitchTo(row_cxt);
			b = DatumGetByteaPP(cells);
			billing_segments_open(&segs, keys[ki], !null_seq,
								  null_seq ? 0 : DatumGetInt64(seq),
								  VARDATA_ANY(b), VARSIZE_ANY_EXHDR(b));
			while (billing_segments_next(&segs, &seg, &r))
				if (seg.account_id == account)
					folded += fold_cells(&r, &seg, ps, pe, pt, *cxt);
			MemoryContextSwitchTo(old);
			MemoryContextReset(row_cxt);
			if (folded >= 4096)
			{
				MemoryContext t_cxt = *cxt;

				keep_totals(pt, *spare);
				MemoryContextReset(t_cxt);
				*cxt = *spare;
				*spare = t_cxt;
				folded = 0;
			}
		}
	}
}

/*
 * billing_rollup_totals
 *		billing._rollup_totals(accounts, starts, ends, meters, aggregations
 *		[, s_idx, s_meters, s_dims]) RETURNS TABLE (idx integer, meter text,
 *		quantity numeric, last_ts timestamptz, last_seq bigint [, dimension
 *		text]): per period (1-based idx into the arrays) and meter with cells
 *		in the period, the meter's aggregate; with the s_ arrays, one row
 *		for each dimension s_dims[j] named for period s_idx[j] and meter
 *		s_meters[j] that has cells, and one (dimension NULL) for the other
 *		cells of the meter (see the top of the file).  Elements of the s_
 *		arrays with a NULL are ignored.
 */
Datum
billing_rollup_totals(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum	   *accounts,
			   *starts,
			   *ends,
			   *meters,
			   *aggs;
	bool	   *acc_null,
			   *start_null,
			   *end_null,
			   *meter_null,
			   *agg_null;
	int			n_acc,
				n_start,
				n_end,
				n_meter,
				n_agg;
	Aggregation *kinds;
	CellTable	table;
	CellTable	v10[3];			/* a 1.0 install: buckets, hourly, daily */
	bool		is_v10;
	Snapshot	snapshot = GetActiveSnapshot();
	MemoryContext per_period;
	bool		split = PG_NARGS() >= 8;
	bool		dim_column;
	int		   *group_first = NULL; /* entries of period i: group_of[first[i]..first[i+1]) */
	int		   *group_of = NULL;
	Datum	   *split_meters = NULL,
			   *split_dims = NULL;
	PeriodTotals pt;
	DeltaTable	deltas = {0};
	MemoryContext spare,
				row_cxt;
	int			max_named;

	/*
	 * The function is STRICT from 1.1 on; a 1.0 install (not STRICT) still
	 * calls this with NULLs: no rows, as STRICT gives, never a NULL row.
	 */
	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	for (int a = 0; a < PG_NARGS(); a++)
		if (PG_ARGISNULL(a))
			return (Datum) 0;
	dim_column = rsinfo->setDesc->natts >= 6;
	if (split != dim_column)
		elog(ERROR, "billing._rollup_totals: the split arguments and the dimension column go together");
	n_acc = billing_array_elems(PG_GETARG_ARRAYTYPE_P(0), INT8OID, 8, true, TYPALIGN_DOUBLE,
								&accounts, &acc_null, -1, "accounts", true);
	n_start = billing_array_elems(PG_GETARG_ARRAYTYPE_P(1), TIMESTAMPTZOID, 8, true,
								  TYPALIGN_DOUBLE, &starts, &start_null, -1, "starts", true);
	n_end = billing_array_elems(PG_GETARG_ARRAYTYPE_P(2), TIMESTAMPTZOID, 8, true,
								TYPALIGN_DOUBLE, &ends, &end_null, -1, "ends", true);
	n_meter = billing_array_elems(PG_GETARG_ARRAYTYPE_P(3), TEXTOID, -1, false, TYPALIGN_INT,
								  &meters, &meter_null, -1, "meters", true);
	n_agg = billing_array_elems(PG_GETARG_ARRAYTYPE_P(4), TEXTOID, -1, false, TYPALIGN_INT,
								&aggs, &agg_null, -1, "aggregations", true);
	if (n_acc != n_start || n_acc != n_end || n_meter != n_agg)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("accounts, starts and ends, and meters and aggregations, must have the same length")));
	if (split)
	{
		Datum	   *s_idx;
		bool	   *idx_null,
				   *sm_null,
				   *sd_null;
		int			n_idx,
					n_sm,
					n_sd;
		int		   *fill;

		n_idx = billing_array_elems(PG_GETARG_ARRAYTYPE_P(5), INT4OID, 4, true, TYPALIGN_INT,
									&s_idx, &idx_null, -1, "s_idx", true);
		n_sm = billing_array_elems(PG_GETARG_ARRAYTYPE_P(6), TEXTOID, -1, false, TYPALIGN_INT,
								   &split_meters, &sm_null, -1, "s_meters", true);
		n_sd = billing_array_elems(PG_GETARG_ARRAYTYPE_P(7), TEXTOID, -1, false, TYPALIGN_INT,
								   &split_dims, &sd_null, -1, "s_dims", true);
		if (n_idx != n_sm || n_idx != n_sd)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("s_idx, s_meters and s_dims must have the same length")));
		/* the named dimensions grouped by period (a counting sort on idx) */
		group_first = palloc0((n_acc + 2) * sizeof(int));
		group_of = palloc(Max(n_idx, 1) * sizeof(int));
		fill = palloc0((n_acc + 1) * sizeof(int));
		for (int j = 0; j < n_idx; j++)
		{
			int			p;

			if (idx_null[j] || sm_null[j] || sd_null[j])
				continue;
			p = DatumGetInt32(s_idx[j]);
			if (p >= 1 && p <= n_acc)
				group_first[p + 1]++;
		}
		for (int p = 1; p <= n_acc + 1; p++)
			group_first[p] += group_first[p - 1];
		for (int j = 0; j < n_idx; j++)
		{
			int			p;

			if (idx_null[j] || sm_null[j] || sd_null[j])
				continue;
			p = DatumGetInt32(s_idx[j]);
			if (p >= 1 && p <= n_acc)
				group_of[group_first[p] + fill[p]++] = j;
		}
	}
	/* room for every meter and the most dimensions one period can name */
	max_named = split ? group_first[n_acc + 1] : 0;
	kinds = palloc(Max(n_meter, 1) * sizeof(Aggregation));
	for (int k = 0; k < n_meter; k++)
		kinds[k] = agg_null[k] ? AGG_SUM : billing_aggregation(TextDatumGetCString(aggs[k]));
	pt.n_meter = n_meter;
	pt.meters = meters;
	pt.kinds = kinds;
	pt.first = palloc(Max(n_meter, 1) * sizeof(int));
	pt.nnamed = palloc(Max(n_meter, 1) * sizeof(int));
	pt.tots = palloc((n_meter + max_named + 1) * sizeof(MeterTotal));
	pt.named = palloc((max_named + 1) * sizeof(Datum));

	/*
	 * billing.so serves a 1.0 install too, whose compacted cells are in
	 * usage_buckets with hour and day roll-ups (usage_hourly, usage_daily)
	 */
	is_v10 = !OidIsValid(get_relname_relid("usage_days", get_namespace_oid("billing", false)));
	if (is_v10)
	{
		open_table(&v10[0], "usage_buckets", "bucket_start", snapshot);
		open_table(&v10[1], "usage_hourly", "bucket_start", snapshot);
		open_table(&v10[2], "usage_daily", "bucket_start", snapshot);
	}
	else
	{
		open_table(&table, "usage_days", "day", snapshot);
		open_deltas(&deltas, snapshot);
	}

	per_period = AllocSetContextCreate(CurrentMemoryContext, "billing rollup totals",
									   ALLOCSET_DEFAULT_SIZES);
	spare = AllocSetContextCreate(CurrentMemoryContext, "billing rollup totals",
								  ALLOCSET_DEFAULT_SIZES);
	row_cxt = AllocSetContextCreate(CurrentMemoryContext, "billing rollup delta row",
									ALLOCSET_DEFAULT_SIZES);
	for (int i = 0; i < n_acc; i++)
	{
		int64		account;
		TimestampTz ps,
					pe,
					fd,
					d0,
					d1;

		if (acc_null[i] || start_null[i] || end_null[i])
			continue;
		account = DatumGetInt64(accounts[i]);
		ps = DatumGetTimestampTz(starts[i]);
		pe = DatumGetTimestampTz(ends[i]);
		if (TIMESTAMP_NOT_FINITE(ps) || TIMESTAMP_NOT_FINITE(pe))
			ereport(ERROR,
					(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
					 errmsg("a billing period must have finite bounds")));
		if (ps >= pe)
			continue;

		fd = billing_bin_start(ps, USECS_PER_DAY);
		d0 = (fd == ps) ? fd : fd + USECS_PER_DAY;
		d1 = billing_bin_start(pe, USECS_PER_DAY);

		/* the dimensions named for this period, meter by meter */
		for (int k = 0, at = 0; k < n_meter; k++)
		{
			int			nnamed = 0;

			pt.first[k] = at + k;
			if (split && !meter_null[k])
				for (int g = group_first[i + 1]; g < group_first[i + 2]; g++)
					if (text_equal(split_meters[group_of[g]], meters[k]))
						pt.named[at + nnamed++] = split_dims[group_of[g]];
			pt.nnamed[k] = nnamed;
			at += nnamed;
		}
		memset(pt.tots, 0, (n_meter + max_named + 1) * sizeof(MeterTotal));

		for (int k = 0; k < n_meter; k++)
		{
			int			nnamed = pt.nnamed[k];
			MeterTotal *tots = &pt.tots[pt.first[k]];
			Datum	   *named = &pt.named[pt.first[k] - k];

			if (meter_null[k])
				continue;

			if (is_v10)
			{
				TimestampTz fh = billing_bin_start(ps, USECS_PER_HOUR);
				TimestampTz h0 = (fh == ps) ? fh : fh + USECS_PER_HOUR;
				TimestampTz h1 = billing_bin_start(pe, USECS_PER_HOUR);

				/* 1.0: minutes at the edges, hours, days */
				scan_range(&v10[0], account, meters[k], ps, Min(h0, pe), 0, 0, kinds[k],
						   named, nnamed, tots, per_period);
				scan_range(&v10[0], account, meters[k], Max(Max(h1, h0), ps), pe, 0, 0,
						   kinds[k], named, nnamed, tots, per_period);
				scan_range(&v10[1], account, meters[k], h0, Min(d0, h1), 0, 0, kinds[k],
						   named, nnamed, tots, per_period);
				scan_range(&v10[1], account, meters[k], Max(Max(d1, d0), h0), h1, 0, 0,
						   kinds[k], named, nnamed, tots, per_period);
				scan_range(&v10[2], account, meters[k], d0, d1, 0, 0, kinds[k],
						   named, nnamed, tots, per_period);
			}
			/* the cells of the day holding ps before the first whole day */
			else if (ps < d0)
				scan_range(&table, account, meters[k], fd, fd + USECS_PER_DAY, ps, Min(d0, pe),
						   kinds[k], named, nnamed, tots, per_period);
			/* whole days */
			if (!is_v10)
				scan_range(&table, account, meters[k], d0, d1, 0, 0, kinds[k],
						   named, nnamed, tots, per_period);
			/* the cells of the last day before pe, after the whole days */
			if (!is_v10 && d1 >= d0 && pe > d1)
				scan_range(&table, account, meters[k], d1, d1 + USECS_PER_DAY, d1, pe,
						   kinds[k], named, nnamed, tots, per_period);
		}

		/* the cells not yet compacted (1.1 on: a 1.0 install reads them in SQL) */
		if (!is_v10)
			fold_deltas(&deltas, account, ps, pe, &pt, &per_period, &spare, row_cxt);

		for (int k = 0; k < n_meter; k++)
		{
			int			nnamed = pt.nnamed[k];
			MeterTotal *tots = &pt.tots[pt.first[k]];
			Datum	   *named = &pt.named[pt.first[k] - k];

			if (meter_null[k])
				continue;
			for (int j = 0; j <= nnamed; j++)
			{
				MeterTotal *m = &tots[j];
				Datum		values[6];
				bool		nulls[6] = {false, false, false, false, false, false};

				if (!m->any)
					continue;
				values[0] = Int32GetDatum(i + 1);
				values[1] = meters[k];
				values[2] = NumericGetDatum(billing_cell_numeric(&m->acc));
				values[3] = TimestampTzGetDatum(m->acc.last_ts);
				nulls[3] = (m->acc.last_ts == AGG_NO_TS);
				values[4] = Int64GetDatum(m->acc.last_seq);
				nulls[4] = (m->acc.last_seq == AGG_NO_SEQ);
				/* the dimension: NULL for the cells of every other dimension */
				values[5] = j == 0 ? (Datum) 0 : named[j - 1];
				nulls[5] = j == 0;
				tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
			}
		}
		MemoryContextReset(per_period);
	}
	MemoryContextDelete(per_period);
	MemoryContextDelete(spare);
	MemoryContextDelete(row_cxt);

	if (is_v10)
		for (int t = 0; t < 3; t++)
			close_table(&v10[t]);
	else
	{
		close_table(&table);
		close_deltas(&deltas);
	}
	return (Datum) 0;
}
