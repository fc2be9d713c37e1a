/*
 * ingest_flush.c
 *		Flushing an accumulator: its memory budget (work_mem), claiming the
 *		queued event ids, checking the accounts, and turning the counter
 *		cells into delta rows of billing.usage_deltas.
 *
 * A flush sorts the cells by (account, meter, dimension, bucket), packs
 * each account's cells into one delta row (several when they would not fit
 * in CELLS_ROW_BYTES; see cells.h) and sends the rows to a DeltaWriter
 * (ingest_deltas.c), heap or Citus, chosen once per flush.  On one node
 * the flushes in the middle of a statement put their rows on tape instead
 * (ingest_spill.c), and the statement's last flush merges the runs into
 * one row per account.
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/sequence.h"
#include "miscadmin.h"
#include "utils/memutils.h"

#include "cells.h"
#include "ingest.h"

/* a hint to load memory into the cache ahead of use */
#if defined(__GNUC__) || defined(__clang__)
#define prefetch(p)			__builtin_prefetch(p)
#else
#define prefetch(p)			((void) 0)
#endif

/* a counter cell with its key inline, for sorting without pointer chasing */
typedef struct CellRef
{
	BucketKey	key;
	BucketAcc  *acc;
} CellRef;

/* order of cells: account, meter, dimension, bucket */
static inline int
cell_cmp(const CellRef *a, const CellRef *b)
{
	const BucketKey *x = &a->key;
	const BucketKey *y = &b->key;

	if (x->account_id != y->account_id)
		return x->account_id < y->account_id ? -1 : 1;
	if (x->meter != y->meter)
		return x->meter < y->meter ? -1 : 1;
	if (x->dim != y->dim)
		return x->dim < y->dim ? -1 : 1;
	if (x->bucket_start != y->bucket_start)
		return x->bucket_start < y->bucket_start ? -1 : 1;
	return 0;
}

/* sort_cells(CellRef *, size_t): qsort with cell_cmp inlined */
#define ST_SORT			sort_cells
#define ST_ELEMENT_TYPE	CellRef
#define ST_COMPARE(a, b)	cell_cmp(a, b)
#define ST_SCOPE		static
#define ST_DECLARE
#define ST_DEFINE
#include "lib/sort_template.h"

/* the sort key of an account id: unsigned, in the order of the signed id */
static inline uint64
account_key(const CellRef *c)
{
	return (uint64) c->key.account_id ^ ((uint64) 1 << 63);
}

/*
 * order_cells
 *		Sort cells[0..n) in cell_cmp order, with room for n more in tmp.
 *		A flush holds thousands of accounts with a few cells each: the
 *		cells go in account order by an LSD radix sort over the bits in
 *		which the accounts differ (two passes for ten thousand accounts),
 *		then each account's few cells by sort_cells.  That takes a fraction
 *		of the time sort_cells takes over all of them.
 */
static void
order_cells(CellRef *cells, CellRef *tmp, long n)
{
	uint64		lo,
				hi;
	CellRef    *src = cells;
	CellRef    *dst = tmp;
	int			bits;
	long		i,
				j;

	if (n < 64)
	{
		sort_cells(cells, n);
		return;
	}
	lo = hi = account_key(&cells[0]);
	for (i = 1; i < n; i++)
	{
		uint64		k = account_key(&cells[i]);

		lo = Min(lo, k);
		hi = Max(hi, k);
	}
	bits = (hi == lo) ? 0 : 64 - __builtin_clzll(hi - lo);
	for (int shift = 0; shift < bits; shift += 8)
	{
		long		count[256] = {0};
		long		at = 0;
		CellRef    *swap;

		for (i = 0; i < n; i++)
			count[((account_key(&src[i]) - lo) >> shift) & 0xFF]++;
		if (count[((account_key(&src[0]) - lo) >> shift) & 0xFF] == n)
			continue;			/* one digit: nothing moves */
		for (int d = 0; d < 256; d++)
		{
			long		c = count[d];

			count[d] = at;
			at += c;
		}
		for (i = 0; i < n; i++)
			dst[count[((account_key(&src[i]) - lo) >> shift) & 0xFF]++] = src[i];
		swap = src;
		src = dst;
		dst = swap;
	}
	if (src != cells)
		memcpy(cells, src, n * sizeof(CellRef));
	/* each account's cells */
	for (i = 0; i < n; i = j)
	{
		for (j = i + 1; j < n && cells[j].key.account_id == cells[i].key.account_id; j++)
			;
		if (j - i > 1)
			sort_cells(cells + i, j - i);
	}
}

/*
 * flush_bufs
 *		The accumulator's flush buffers, able to hold ncells cells.
 */
static FlushBufs *
flush_bufs(FlushBufs *fb, long ncells)
{
	if (fb->cap < ncells)
	{
		MemoryContext old = MemoryContextSwitchTo(fb->cxt);
		long		cap = Max(ncells, Max(fb->cap * 2, 16));

		if (fb->cap > 0)
		{
			pfree(fb->cells);
			pfree(fb->sortbuf);
			pfree(fb->accounts);
			pfree(fb->rows.accounts);
			pfree(fb->rows.seqs);
			pfree(fb->rows.noseq);
			pfree(fb->rows.cells);
			pfree(fb->row_offsets);
		}
		else
			initStringInfo(&fb->pack);
		fb->cells = palloc(cap * sizeof(CellRef));
		fb->sortbuf = palloc(cap * sizeof(CellRef));
		fb->accounts = palloc(cap * sizeof(int64));
		fb->rows.accounts = palloc(cap * sizeof(int64));
		fb->rows.seqs = palloc(cap * sizeof(Datum));
		fb->rows.noseq = palloc(cap * sizeof(bool));
		fb->rows.cells = palloc(cap * sizeof(Datum));
		fb->row_offsets = palloc(cap * sizeof(int));
		fb->cap = cap;
		MemoryContextSwitchTo(old);
	}
	return fb;
}

/*
 * pack_deltas
 *		Pack the sorted counter cells into delta rows: one row per account,
 *		or several when its cells would not fit in CELLS_ROW_BYTES.  A row
 *		with cells of a last meter takes a number of billing.usage_seq, its
 *		arrival order.
 */
static void
pack_deltas(const Accum *acc, FlushBufs *fb, long ncells)
{
	CellRef    *cells = fb->cells;
	DeltaRows  *rows = &fb->rows;
	Oid			seqid = InvalidOid;
	long		i = 0;

	rows->nrows = 0;
	resetStringInfo(&fb->pack);
	while (i < ncells)
	{
		int64		account = cells[i].key.account_id;
		int32		meter = -1;
		int32		dim = -1;
		bool		has_last = false;
		CellWriter	cw;
		long		r = rows->nrows++;

		billing_cells_begin(&cw, &fb->pack);
		for (; i < ncells && cells[i].key.account_id == account; i++)
		{
			BucketKey  *k = &cells[i].key;
			BucketAcc  *cell = cells[i].acc;
			Qty			q;

			/* the cells are spread over the hash table: fetch ahead */
			if (i + 8 < ncells)
				prefetch(cells[i + 8].acc);
			if (cells_size(&cw) >= CELLS_ROW_BYTES)
				break;			/* the rest in another row */
			if (k->meter != meter || k->dim != dim)
			{
				MeterSlot  *slot = acc->slots[k->meter];
				DimEntry   *d = acc->dims[k->dim];
				bool		is_last = (slot->def.agg == AGG_LAST);

				billing_cells_series(&cw, slot->name, slot->namelen, d->str, d->len, is_last);
				has_last |= is_last;
				meter = k->meter;
				dim = k->dim;
			}
			cell_qty(cell, &q);
			billing_cells_add(&cw, k->bucket_start, cell->events, q.isdec,
							  q.dec, q.num, cell->last_ts);
		}
		rows->accounts[r] = account;
		rows->noseq[r] = !has_last;
		if (has_last)
		{
			if (!OidIsValid(seqid))
				seqid = billing_relid("usage_seq");
			rows->seqs[r] = Int64GetDatum(nextval_internal(seqid, false));
		}
		else
			rows->seqs[r] = (Datum) 0;
		fb->row_offsets[r] = billing_cells_end(&cw);
	}
	/* the buffer is complete: point at the values */
	for (long r = 0; r < rows->nrows; r++)
		rows->cells[r] = PointerGetDatum(fb->pack.data + fb->row_offsets[r]);
}

/*
 * write_rows
 *		Write the delta rows with w, and close it.
 */
static void
write_rows(DeltaWriter *w, const DeltaRows *rows)
{
	for (long i = 0; i < rows->nrows; i++)
		(void) w->add(w, rows->accounts[i], !rows->noseq[i],
					  DatumGetInt64(rows->seqs[i]), rows->cells[i]);
	w->close(w);
}

/*
 * billing_flush_cells
 *		Check the accounts of the counter cells, write the cells as delta
 *		rows (or, in the middle of a statement on one node, put them on
 *		tape; final: the statement ends, write what is on tape too), and
 *		empty the cell table.
 */
void
billing_flush_cells(IngestState *st, bool final)
{
	Accum	   *acc = &st->acc;
	bucket_iterator it;
	BucketAcc  *cell;
	FlushBufs  *fb;
	long		ncells;
	long		naccounts = 0;
	long		i = 0;
	bool		distributed;
	MemoryContext tmp;
	MemoryContext old;

	billing_acc_settle(acc);
	if (acc->buckets->members == 0)
	{
		/* runs exist on one node only */
		if (final && st->runs.nruns > 0)
		{
			tmp = AllocSetContextCreate(CurrentMemoryContext, "billing merge",
										ALLOCSET_DEFAULT_SIZES);
			old = MemoryContextSwitchTo(tmp);
			billing_runs_merge(&st->runs, billing_deltas_open(false));
			MemoryContextSwitchTo(old);
			MemoryContextDelete(tmp);
			CommandCounterIncrement();
		}
		return;
	}

	/* group the cells by (account, meter, dimension), buckets in order */
	ncells = acc->buckets->members;
	fb = flush_bufs(&st->flush, ncells);
	bucket_start_iterate(acc->buckets, &it);
	while ((cell = bucket_iterate(acc->buckets, &it)) != NULL)
	{
		fb->cells[i].key = cell->key;
		fb->cells[i++].acc = cell;
	}
	order_cells(fb->cells, fb->sortbuf, ncells);

	/* every account counted must exist */
	for (i = 0; i < ncells; i++)
		if (i == 0 || fb->cells[i].key.account_id != fb->cells[i - 1].key.account_id)
			fb->accounts[naccounts++] = fb->cells[i].key.account_id;
	billing_check_new_accounts(&st->known, fb->accounts, naccounts);

	tmp = AllocSetContextCreate(CurrentMemoryContext, "billing flush",
								ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(tmp);
	pack_deltas(acc, fb, ncells);
	/* heap or Citus: chosen once, here */
	distributed = billing_distributed();
	if (distributed || (final && st->runs.nruns == 0))
		write_rows(billing_deltas_open(distributed), &fb->rows);
	else
	{
		/*
		 * In the middle of a statement (or at its end, after such flushes)
		 * the rows go on tape, sorted by account, and the statement's end
		 * merges the runs into one row per account: a COPY flushing dozens
		 * of times would otherwise write a row per account each time, and
		 * the rows, not their bytes, cost most.
		 */
		if (st->runs.nruns == MAX_RUNS)
			billing_runs_merge(&st->runs, billing_deltas_open(distributed));
		billing_runs_put(&st->runs, &fb->rows);
		if (final)
			billing_runs_merge(&st->runs, billing_deltas_open(distributed));
	}
	MemoryContextSwitchTo(old);
	MemoryContextDelete(tmp);
	if (acc->numeric_cells)
		for (i = 0; i < ncells; i++)
			if (!fb->cells[i].acc->isdec)
				pfree(fb->cells[i].acc->q.num);
	acc->numeric_cells = false;

	/* empty the counters; the table keeps its (bounded) capacity */
	bucket_reset(acc->buckets);
	CommandCounterIncrement();
}

/*
 * billing_flush
 *		Claim the queued event ids, check accounts, write every counter
 *		cell as a delta row, and empty the accumulator, with the extension
 *		owner's rights (the caller may be a trigger on a user's table).
 */
void
billing_flush(IngestState *st)
{
	BillingOwnerScope	scope;

	billing_owner_begin(&scope);
	billing_claim_pending(st);
	billing_flush_cells(st, true);
	st->acc.nreports = 0;		/* the table is empty: arrival order restarts */
	billing_owner_end(&scope);
}

/*
 * flush_some
 *		Make room in the accumulator in the middle of a statement: claim
 *		the queued ids and put the cells aside (see billing_flush_cells),
 *		with the extension owner's rights.
 */
static void
flush_some(IngestState *st)
{
	BillingOwnerScope	scope;

	billing_owner_begin(&scope);
	billing_claim_pending(st);
	billing_flush_cells(st, false);
	st->acc.nreports = 0;		/* the table is empty: arrival order restarts */
	billing_owner_end(&scope);
}

/*
 * billing_flush_if_full
 *		Flush early when the accumulator has grown past work_mem, so memory
 *		stays bounded however many rows a statement sends, or when its
 *		arrival order would pass what a cell keeps (MAX_TABLE_REPORTS).
 */
void
billing_flush_if_full(IngestState *st)
{
	Size		budget = (Size) work_mem * 1024;

	/*
	 * Flush before the cell table would double past its room, or when the
	 * queued event ids fill the rest of the budget.  The claim counts the
	 * winners into the cell table and writes it whenever it fills (see
	 * billing_claim_pending): big queues make the claim cheaper per id.
	 */
	if (cells_at_limit(st, budget) || st->claims.pending_bytes > budget - budget / 4 ||
		st->acc.nreports >= MAX_TABLE_REPORTS)
		flush_some(st);

	/*
	 * A table bigger than its room (simplehash doubles early when probes
	 * run long, and the room shrinks when ids start to queue): flush and
	 * start again from a small table.
	 */
	if ((Size) st->acc.buckets->size * sizeof(BucketAcc) > cells_room(st, budget))
	{
		Size		room = cells_room(st, budget);
		uint32		size = 64;

		flush_some(st);
		bucket_destroy(st->acc.buckets);
		/* the largest table that fits the room it lacked (at least 64 cells) */
		while ((Size) size * 2 * sizeof(BucketAcc) <= room)
			size *= 2;
		st->acc.buckets = bucket_create(st->acc.cells_cxt, size / 2, NULL);
	}
}
