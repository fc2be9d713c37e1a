/*
 * compact_deltas.c
 *		The deltas taken out of billing.usage_deltas and decoded into a
 *		batch (step 1 of compact.h).
 *
 * On one node (and for a shard of usage_deltas, on its node) the heap is
 * read straight, with a snapshot taken after the compaction's lock, and
 * every row read is deleted; rows appended after the snapshot stay for the
 * next compaction.  On a Citus coordinator in a transaction block one
 * DELETE ... RETURNING, read through a cursor, takes them out of every
 * shard.  Either way, whenever the batch takes maintenance_work_mem it is
 * folded (billing_compact_fold) and a new one begun.
 *
 * A delta row's cells (src/cells.c) join the batch's one array of cells,
 * each with its account and the index of its series (meter, dimension),
 * the series being interned in a hash of the batch.  Quantities that fit
 * stay fixed point (a 64-bit coefficient and a scale) until a merge needs
 * them as numerics.  The cells of a meter billing.meters does not have are
 * dropped.
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "catalog.h"
#include "compact.h"
#include "util.h"

/* delta rows fetched at a time */
#define FETCH_ROWS		1000

/* hash of a series key */
static uint32
series_hash_fn(const void *key, Size keysize)
{
	const SeriesKey *k = (const SeriesKey *) key;

	return DatumGetUInt32(hash_any((const unsigned char *) k->bytes, k->len));
}

/* equality of series keys (0: equal) */
static int
series_match_fn(const void *a, const void *b, Size keysize)
{
	const SeriesKey *x = (const SeriesKey *) a;
	const SeriesKey *y = (const SeriesKey *) b;

	if (x->len != y->len)
		return 1;
	return memcmp(x->bytes, y->bytes, x->len);
}

/* the meter named name[0..len), or NULL */
static const CMeter *
find_meter(const Compaction *cp, const char *name, int len)
{
	int			lo = 0,
				hi = cp->nmeters - 1;

	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;
		const CMeter *m = &cp->meters[mid];
		int			c = memcmp(m->name, name, Min(m->len, len));

		if (c == 0)
			c = (m->len > len) - (m->len < len);
		if (c == 0)
			return m;
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return NULL;
}

/* start a batch: empty series and cells */
void
billing_compact_begin(Compaction *cp)
{
	HASHCTL		ctl;

	MemoryContextReset(cp->batch_cxt);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(SeriesKey);
	ctl.entrysize = sizeof(Series);
	ctl.hash = series_hash_fn;
	ctl.match = series_match_fn;
	ctl.hcxt = cp->batch_cxt;
	cp->series_hash = hash_create("billing compaction series", 256, &ctl,
								  HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
	cp->series = NULL;
	cp->nseries = 0;
	cp->series_cap = 0;
	/*
	 * the cells of a batch in one array sized for the most that fit in the
	 * limit: allocated once (untouched pages cost nothing), never copied
	 * to grow
	 */
	MemoryContextReset(cp->cells_cxt);
	cp->cells_cap = (int) (Min(cp->limit, (Size) 256 * 1024 * 1024) / sizeof(BatchCell)) + 1024;
	cp->cells = MemoryContextAllocExtended(cp->cells_cxt, cp->cells_cap * sizeof(BatchCell),
										   MCXT_ALLOC_HUGE);
	cp->ncells = 0;
}

/* bytes the batch takes */
static inline Size
batch_bytes(Compaction *cp)
{
	return MemoryContextMemAllocated(cp->batch_cxt, true) + cp->ncells * sizeof(BatchCell);
}

/*
 * series_of
 *		The batch's series of (meter, dimension), added when new; NULL for
 *		a meter billing.meters does not have (its cells are dropped, as the
 *		join with billing.meters of 1.0's compaction dropped them).
 */
static Series *
series_of(Compaction *cp, const CellSeries *s)
{
	char		tmp[SERIES_KEY_TMP];
	SeriesKey	key = billing_series_key(s->meter, s->meterlen, s->dim, s->dimlen, tmp);
	const char *buf = key.bytes;
	Series	   *e;
	bool		found;
	const CMeter *m;

	e = hash_search(cp->series_hash, &key, HASH_FIND, NULL);
	if (e != NULL)
		return e->meter ? e : NULL;
	m = find_meter(cp, s->meter, s->meterlen);
	/* a key that outlives buf */
	key.bytes = MemoryContextAlloc(cp->batch_cxt, key.len);
	memcpy((char *) key.bytes, buf, key.len);
	e = hash_search(cp->series_hash, &key, HASH_ENTER, &found);
	e->key = key;
	e->meter = m;
	e->dim = key.bytes + 1 + s->meterlen;
	e->dimlen = s->dimlen;
	if (m == NULL)
		return NULL;
	if (cp->nseries == cp->series_cap)
		cp->series = billing_grow(cp->series, &cp->series_cap, sizeof(Series *), 64,
								  cp->batch_cxt);
	e->index = cp->nseries;
	cp->series[cp->nseries++] = e;
	return e;
}

/*
 * fixed_quantity
 *		Set the quantity of b from dec, a fixed-point value of
 *		CELLS_QTY_SCALE digits: coef / 10^scale with the fewest digits (the
 *		display scale the numeric of billing._delta_cells has), or a
 *		numeric beyond 64 bits.
 */
static void
fixed_quantity(BatchCell *b, int128_t dec)
{
	int			s = CELLS_QTY_SCALE;

	/* most quantities are whole numbers */
	if (dec % billing_dec_pow10[CELLS_QTY_SCALE] == 0)
	{
		dec /= billing_dec_pow10[CELLS_QTY_SCALE];
		s = 0;
	}
	else
		while (s > 0 && dec % 10 == 0)
		{
			dec /= 10;
			s--;
		}
	if (dec >= PG_INT64_MIN && dec <= PG_INT64_MAX)
	{
		b->coef = (int64) dec;
		b->scale = s;
	}
	else
		b->c.num = billing_dec_to_numeric(dec, s);
}

/*
 * add_cells
 *		Decode the cells r reads, one account's part seg of a delta row,
 *		into the batch.
 */
static void
add_cells(Compaction *cp, CellReader *r, const DeltaSegment *seg)
{
	CellSeries	s;

	while (billing_cells_next_series(r, &s))
	{
		Series	   *ser = series_of(cp, &s);

		for (uint32 i = 0; i < s.ncells; i++)
		{
			Cell		c;
			BatchCell  *b;

			billing_cells_next(r, &s, &c);
			if (ser == NULL)
				continue;
			if (cp->ncells == cp->cells_cap)
			{
				/* a delta row with more cells than the limit left room for */
				cp->cells_cap *= 2;
				cp->cells = repalloc_huge(cp->cells, cp->cells_cap * sizeof(BatchCell));
			}
			b = &cp->cells[cp->ncells++];
			b->account = seg->account_id;
			b->series = ser->index;
			b->c.bucket = c.bucket_start;
			b->c.events = c.events;
			b->scale = -1;
			b->c.num = NULL;
			if (c.isdec)
				fixed_quantity(b, c.dec);
			else
				b->c.num = c.num;
			if (s.is_last)
			{
				b->c.last_ts = c.last_ts;
				b->c.last_seq = seg->has_seq ? seg->seq : AGG_NO_SEQ;
			}
			else
			{
				b->c.last_ts = AGG_NO_TS;
				b->c.last_seq = AGG_NO_SEQ;
			}
			cp->folded++;
		}
	}
}

/*
 * add_delta_row
 *		Decode the cells of one delta row (its account_id, seq, packed
 *		cells: one account's, or a group row's of several, each with its
 *		own seq) into the batch.
 */
static void
add_delta_row(Compaction *cp, int64 row_account, bool seq_null, int64 seq, bytea *packed)
{
	DeltaSegments segs;
	DeltaSegment seg;
	CellReader	r;
	MemoryContext old = MemoryContextSwitchTo(cp->batch_cxt);

	billing_segments_open(&segs, row_account, !seq_null, seq, VARDATA_ANY(packed),
						  VARSIZE_ANY_EXHDR(packed));
	while (billing_segments_next(&segs, &seg, &r))
		add_cells(cp, &r, &seg);
	MemoryContextSwitchTo(old);
}

/*
 * billing_compact_take_sql
 *		Take the deltas out with DELETE ... RETURNING through a cursor
 *		(a Citus coordinator: the statement reaches every shard) and fold
 *		them in batches.
 */
void
billing_compact_take_sql(Compaction *cp)
{
	SPIPlanPtr	plan;
	Portal		portal;

	plan = SPI_prepare("DELETE FROM billing.usage_deltas RETURNING account_id, seq, cells", 0,
					   NULL);
	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	portal = SPI_cursor_open("billing_compact_deltas", plan, NULL, NULL, false);
	for (;;)
	{
		SPITupleTable *tt;
		uint64		n;

		SPI_cursor_fetch(portal, true, FETCH_ROWS);
		tt = SPI_tuptable;
		n = SPI_processed;
		if (n == 0)
			break;
		for (uint64 i = 0; i < n; i++)
		{
			HeapTuple	tup = tt->vals[i];
			TupleDesc	desc = tt->tupdesc;
			bool		null_acc,
						null_seq,
						null_cells;
			Datum		acc = SPI_getbinval(tup, desc, 1, &null_acc);
			Datum		seq = SPI_getbinval(tup, desc, 2, &null_seq);
			Datum		cells = SPI_getbinval(tup, desc, 3, &null_cells);

			if (null_acc || null_cells)
				continue;
			add_delta_row(cp, DatumGetInt64(acc), null_seq,
						  null_seq ? 0 : DatumGetInt64(seq), DatumGetByteaPP(cells));
			/* a batch holds what fits in maintenance_work_mem */
			if (batch_bytes(cp) >= cp->limit)
			{
				billing_compact_fold(cp);
				billing_compact_begin(cp);
			}
		}
		SPI_freetuptable(tt);
	}
	SPI_cursor_close(portal);
}

/*
 * billing_compact_take_heap
 *		Read the deltas straight from the heap of usage_deltas (one node)
 *		or of a shard of it (on its node),
 *		with a snapshot taken now (after the lock: what an earlier
 *		compaction deleted is gone), deleting each row read, and fold them
 *		in batches.  Rows appended after the snapshot stay for the next
 *		compaction.
 */
void
billing_compact_take_heap(Compaction *cp)
{
	Relation	rel = table_open(cp->deltas_rel, RowExclusiveLock);
	Snapshot	snap = RegisterSnapshot(GetLatestSnapshot());
	TableScanDesc scan = table_beginscan(rel, snap, 0, NULL);
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	AttrNumber	att_acc = get_attnum(RelationGetRelid(rel), "account_id");
	AttrNumber	att_seq = get_attnum(RelationGetRelid(rel), "seq");
	AttrNumber	att_cells = get_attnum(RelationGetRelid(rel), "cells");

	if (att_acc == InvalidAttrNumber || att_seq == InvalidAttrNumber ||
		att_cells == InvalidAttrNumber)
		elog(ERROR, "billing.usage_deltas does not have the columns compaction reads");
	while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		bool		null_acc,
					null_seq,
					null_cells;
		Datum		acc = slot_getattr(slot, att_acc, &null_acc);
		Datum		seq = slot_getattr(slot, att_seq, &null_seq);
		Datum		cells = slot_getattr(slot, att_cells, &null_cells);

		CHECK_FOR_INTERRUPTS();
		if (!null_acc && !null_cells)
		{
			MemoryContext old = MemoryContextSwitchTo(cp->row_cxt);

			add_delta_row(cp, DatumGetInt64(acc), null_seq,
						  null_seq ? 0 : DatumGetInt64(seq), DatumGetByteaPP(cells));
			MemoryContextSwitchTo(old);
			MemoryContextReset(cp->row_cxt);
		}
		simple_heap_delete(rel, &slot->tts_tid);
		/* a batch holds what fits in maintenance_work_mem */
		if (batch_bytes(cp) >= cp->limit)
		{
			billing_compact_fold(cp);
			billing_compact_begin(cp);
		}
	}
	ExecDropSingleTupleTableSlot(slot);
	table_endscan(scan);
	UnregisterSnapshot(snap);
	table_close(rel, NoLock);
}
