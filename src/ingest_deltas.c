/*
 * ingest_deltas.c
 *		DeltaWriter: where delta rows (an account, its seq, its packed
 *		cells) go, behind one interface (see ingest.h) with two
 *		implementations, chosen once per flush:
 *
 *		- on one node, multi-inserts straight into the heap and index of
 *		  billing.usage_deltas, the way COPY writes, WRITE_BATCH rows at a
 *		  time.  The rows of consecutive accounts of one block of ids
 *		  (billing_delta_group) with few cells each go into one group row
 *		  while it stays under CELLS_ROW_BYTES (cells.h): a flush over
 *		  thousands of accounts writes a few hundred rows and index
 *		  entries, not one per account;
 *		- on Citus, where usage_deltas is a shell here, SQL that Citus routes
 *		  to the shards, all rows at close: one row in a router INSERT, more
 *		  in one INSERT ... SELECT over parallel arrays, which Citus splits by
 *		  shard and copies to each shard in one go.
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "nodes/makefuncs.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/memutils.h"
#include "utils/rel.h"

#include "catalog.h"
#include "cells.h"
#include "ingest.h"

/* the plan of the Citus writer's router INSERT */
static SPIPlanPtr citus_delta_plan = NULL;

/*
 * The largest account's part that goes into a group row: an account with
 * more cells in the flush gets a row of its own
 */
#define GROUP_PART_MAX		(CELLS_ROW_BYTES / 8)

/* a DeltaWriter into the heap of billing.usage_deltas */
typedef struct HeapWriter
{
	DeltaWriter pub;
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleDesc	desc;			/* a copy of the relation's, for the slots */
	TupleTableSlot **slots;		/* made as needed, up to WRITE_BATCH */
	int			nmade;
	int			maxslots;
	int			n;				/* rows queued in slots[0..n) */
	CommandId	cid;
	MemoryContext cxt;			/* holds the writer's own state */
	MemoryContext rowcxt;		/* the values of the queued rows */
	MemoryContext groupcxt;		/* the rows of the group being filled */
	bool		grouping;		/* may rows hold several accounts? */
	/* the group being filled: its accounts' rows, as they came */
	int64		gkey;			/* billing_delta_group of its accounts */
	int			gn;				/* rows in it */
	int			gbytes;			/* bytes it would take as a group row */
	int			gcap;
	int64	   *gaccounts;
	Datum	   *gcells;			/* copies, in groupcxt */
	int64	   *gseqs;			/* each row's seq, if gwith_seq */
	bool	   *gwith_seq;
	StringInfoData gbuf;		/* where a group row is formed */
} HeapWriter;

/* a DeltaWriter through Citus: the rows, written at close */
typedef struct CitusWriter
{
	DeltaWriter pub;
	long		n;
	long		cap;
	Datum	   *accounts;
	Datum	   *seqs;
	bool	   *noseq;
	Datum	   *cells;
	MemoryContext cxt;
} CitusWriter;

/*
 * heap_flush
 *		Multi-insert the queued rows and their index entries.
 */
static void
heap_flush(HeapWriter *w)
{
	int			i;

	if (w->n == 0)
		return;
	table_multi_insert(w->rel, w->slots, w->n, w->cid, 0, NULL);
	for (i = 0; i < w->n; i++)
	{
		List	   *r = ExecInsertIndexTuples(w->rri, w->slots[i], w->estate,
											  false, false, NULL, NIL);

		list_free(r);
		ExecClearTuple(w->slots[i]);
	}
	ResetPerTupleExprContext(w->estate);
	w->n = 0;
	MemoryContextReset(w->rowcxt);
}

/*
 * heap_queue
 *		Queue one row for the heap; a full batch is written at once.
 */
static void
heap_queue(HeapWriter *w, int64 account_id, bool has_seq, int64 seq, Datum cells)
{
	TupleTableSlot *slot;

	if (w->n == w->nmade)
	{
		MemoryContext old = MemoryContextSwitchTo(w->cxt);

		if (w->nmade == w->maxslots)
			w->slots = billing_grow(w->slots, &w->maxslots, sizeof(TupleTableSlot *), 16,
									w->cxt);
		w->slots[w->nmade++] = MakeSingleTupleTableSlot(w->desc, table_slot_callbacks(w->rel));
		MemoryContextSwitchTo(old);
	}
	slot = w->slots[w->n];
	ExecClearTuple(slot);
	/* account_id, seq, cells */
	slot->tts_values[0] = Int64GetDatum(account_id);
	slot->tts_isnull[0] = false;
	slot->tts_values[1] = Int64GetDatum(seq);
	slot->tts_isnull[1] = !has_seq;
	slot->tts_values[2] = cells;
	slot->tts_isnull[2] = false;
	ExecStoreVirtualTuple(slot);
	if (++w->n == WRITE_BATCH)
		heap_flush(w);
}

/*
 * group_write
 *		Queue the group being filled: its one row as it came, or a group row
 *		of its rows under the group's key.
 */
static void
group_write(HeapWriter *w)
{
	if (w->gn == 0)
		return;
	if (w->gn == 1)
	{
		MemoryContext old = MemoryContextSwitchTo(w->rowcxt);
		Datum		one = PointerGetDatum(PG_DETOAST_DATUM_COPY(w->gcells[0]));

		MemoryContextSwitchTo(old);
		heap_queue(w, w->gaccounts[0], w->gwith_seq[0], w->gseqs[0], one);
	}
	else
	{
		MemoryContext old;
		bytea	   *row;

		billing_group_begin(&w->gbuf);
		for (int i = 0; i < w->gn; i++)
			billing_group_add(&w->gbuf, w->gaccounts[i], w->gwith_seq[i], w->gseqs[i],
							  (struct varlena *) DatumGetPointer(w->gcells[i]));
		row = billing_group_end(&w->gbuf);
		old = MemoryContextSwitchTo(w->rowcxt);
		row = (bytea *) memcpy(palloc(VARSIZE(row)), row, VARSIZE(row));
		MemoryContextSwitchTo(old);
		heap_queue(w, w->gkey, false, 0, PointerGetDatum(row));
	}
	w->gn = 0;
	MemoryContextReset(w->groupcxt);
}

/*
 * heap_add
 *		Add one account's delta row: as a row of its own when it holds
 *		more than GROUP_PART_MAX bytes, else to the group being filled when
 *		the account is of its block and the group row stays under
 *		CELLS_ROW_BYTES, else to a new group.  The row's value is copied.
 */
static bool
heap_add(DeltaWriter *dw, int64 account_id, bool has_seq, int64 seq, Datum cells)
{
	HeapWriter *w = (HeapWriter *) dw;
	int64		key = billing_delta_group(account_id);
	struct varlena *v = (struct varlena *) DatumGetPointer(cells);
	/* as a segment: account, flags, seq, length, series */
	int			bytes = 8 + 1 + (has_seq ? 8 : 0) + 4 + VARSIZE_ANY_EXHDR(v) - 1;
	MemoryContext old;

	if (!w->grouping || bytes > GROUP_PART_MAX)
	{
		/*
		 * A row of its own: grouping is off, or the account has many cells
		 * (a hot account, whose readers should not have to read through
		 * its block's other accounts' cells, nor theirs through its)
		 */
		old = MemoryContextSwitchTo(w->rowcxt);
		cells = PointerGetDatum(PG_DETOAST_DATUM_COPY(cells));
		MemoryContextSwitchTo(old);
		heap_queue(w, account_id, has_seq, seq, cells);
		return true;
	}
	if (w->gn > 0 && (key != w->gkey || w->gbytes + bytes > CELLS_ROW_BYTES))
		group_write(w);
	if (w->gn == 0)
	{
		w->gkey = key;
		w->gbytes = VARHDRSZ + 1;
	}
	if (w->gn == w->gcap)
	{
		old = MemoryContextSwitchTo(w->cxt);
		w->gcap = w->gcap ? w->gcap * 2 : 16;
		w->gaccounts = w->gaccounts ? repalloc(w->gaccounts, w->gcap * sizeof(int64))
			: palloc(w->gcap * sizeof(int64));
		w->gcells = w->gcells ? repalloc(w->gcells, w->gcap * sizeof(Datum))
			: palloc(w->gcap * sizeof(Datum));
		w->gseqs = w->gseqs ? repalloc(w->gseqs, w->gcap * sizeof(int64))
			: palloc(w->gcap * sizeof(int64));
		w->gwith_seq = w->gwith_seq ? repalloc(w->gwith_seq, w->gcap * sizeof(bool))
			: palloc(w->gcap * sizeof(bool));
		MemoryContextSwitchTo(old);
	}
	old = MemoryContextSwitchTo(w->groupcxt);
	w->gcells[w->gn] = PointerGetDatum(PG_DETOAST_DATUM_COPY(cells));
	MemoryContextSwitchTo(old);
	w->gaccounts[w->gn] = account_id;
	w->gseqs[w->gn] = seq;
	w->gwith_seq[w->gn++] = has_seq;
	w->gbytes += bytes;
	return true;
}

/*
 * heap_close
 *		Write the rest, close the relation and free the writer.
 */
static void
heap_close(DeltaWriter *dw)
{
	HeapWriter *w = (HeapWriter *) dw;
	int			i;

	group_write(w);
	heap_flush(w);
	for (i = 0; i < w->nmade; i++)
		ExecDropSingleTupleTableSlot(w->slots[i]);
	if (w->slots)
		pfree(w->slots);
	FreeTupleDesc(w->desc);
	ExecCloseIndices(w->rri);
	FreeExecutorState(w->estate);
	table_close(w->rel, NoLock);
	MemoryContextDelete(w->rowcxt);
	MemoryContextDelete(w->groupcxt);
	if (w->gcap > 0)
	{
		pfree(w->gaccounts);
		pfree(w->gcells);
		pfree(w->gseqs);
		pfree(w->gwith_seq);
	}
	pfree(w->gbuf.data);
	pfree(w);
}

/*
 * heap_open
 *		A writer into the heap and indexes of billing.usage_deltas, in the
 *		current memory context and command.  What the executor allocates
 *		for the relation's indexes stays in that context after close.  A
 *		read-only transaction gets 25006.
 */
static DeltaWriter *
heap_open(void)
{
	HeapWriter *w;

	/* the heap is written straight, past the executor's read-only check */
	PreventCommandIfReadOnly("a usage write");
	w = palloc0(sizeof(HeapWriter));
	w->cxt = CurrentMemoryContext;
	w->pub.add = heap_add;
	w->pub.close = heap_close;
	w->rel = table_open(billing_relid("usage_deltas"), RowExclusiveLock);

	/*
	 * The slots get a copy of the relation's descriptor, which is not
	 * reference-counted: a slot made with the relation's own pins it in the
	 * resource owner, and an ingest() call touching thousands of accounts
	 * made and dropped a thousand slots (4% of the call in that
	 * bookkeeping).  The copy has the same attributes, all the heap and
	 * its index entries are formed from.
	 */
	w->desc = CreateTupleDescCopy(RelationGetDescr(w->rel));
	w->estate = CreateExecutorState();
	w->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(w->rri, w->rel, 1, NULL, 0);
	ExecOpenIndices(w->rri, false);
	w->n = 0;
	w->cid = GetCurrentCommandId(true);
	w->rowcxt = AllocSetContextCreate(w->cxt, "billing delta rows", ALLOCSET_DEFAULT_SIZES);
	w->groupcxt = AllocSetContextCreate(w->cxt, "billing delta group", ALLOCSET_DEFAULT_SIZES);
	w->grouping = billing_group_rows();
	initStringInfo(&w->gbuf);
	return &w->pub;
}

/*
 * citus_add
 *		Keep one delta row for the statement at close.
 */
static bool
citus_add(DeltaWriter *dw, int64 account_id, bool has_seq, int64 seq, Datum cells)
{
	CitusWriter *w = (CitusWriter *) dw;

	if (w->n == w->cap)
	{
		MemoryContext old = MemoryContextSwitchTo(w->cxt);

		w->cap = w->cap ? w->cap * 2 : 64;
		w->accounts = w->accounts ? repalloc(w->accounts, w->cap * sizeof(Datum))
			: palloc(w->cap * sizeof(Datum));
		w->seqs = w->seqs ? repalloc(w->seqs, w->cap * sizeof(Datum))
			: palloc(w->cap * sizeof(Datum));
		w->noseq = w->noseq ? repalloc(w->noseq, w->cap * sizeof(bool))
			: palloc(w->cap * sizeof(bool));
		w->cells = w->cells ? repalloc(w->cells, w->cap * sizeof(Datum))
			: palloc(w->cap * sizeof(Datum));
		MemoryContextSwitchTo(old);
	}
	w->accounts[w->n] = Int64GetDatum(account_id);
	w->seqs[w->n] = has_seq ? Int64GetDatum(seq) : (Datum) 0;
	w->noseq[w->n] = !has_seq;
	w->cells[w->n] = cells;
	w->n++;
	return false;
}

/*
 * citus_close
 *		Write the rows kept, in one statement, and free the writer.
 */
static void
citus_close(DeltaWriter *dw)
{
	CitusWriter *w = (CitusWriter *) dw;
	Datum		values[3];
	char		nulls[3] = {' ', ' ', ' '};
	int			ret;

	if (w->n > 0)
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (w->n == 1)
		{
			/* a router INSERT of one row (record, report_cumulative, ...) */
			Oid			types[3] = {INT8OID, INT8OID, BYTEAOID};

			(void) billing_spi_plan(&citus_delta_plan, "INSERT INTO billing.usage_deltas (account_id, seq, cells) "
									"VALUES ($1, $2, $3)",
									3, types, 0);
			values[0] = w->accounts[0];
			values[1] = w->seqs[0];
			nulls[1] = w->noseq[0] ? 'n' : ' ';
			values[2] = w->cells[0];
			ret = SPI_execute_plan(citus_delta_plan, values, nulls, false, 0);
		}
		else
		{
			Oid			types[3] = {INT8ARRAYOID, INT8ARRAYOID, BYTEAARRAYOID};
			int			dimsize[1] = {(int) w->n};
			int			lbound[1] = {1};

			values[0] = PointerGetDatum(construct_array(w->accounts, w->n, INT8OID, 8, true, TYPALIGN_DOUBLE));
			values[1] = PointerGetDatum(construct_md_array(w->seqs, w->noseq, 1, dimsize, lbound,
														   INT8OID, 8, true, TYPALIGN_DOUBLE));
			values[2] = PointerGetDatum(construct_array(w->cells, w->n, BYTEAOID, -1, false, TYPALIGN_INT));
			/* planned with the values: Citus splits the rows by shard */
			ret = SPI_execute_with_args("INSERT INTO billing.usage_deltas (account_id, seq, cells) "
										"SELECT * FROM ROWS FROM (pg_catalog.unnest($1), "
										"pg_catalog.unnest($2), pg_catalog.unnest($3))",
										3, types, values, nulls, false, 0);
		}
		if (ret != SPI_OK_INSERT || (long) SPI_processed != w->n)
			elog(ERROR, "could not write usage deltas: %s", SPI_result_code_string(ret));
		SPI_finish();
	}
	if (w->cap > 0)
	{
		pfree(w->accounts);
		pfree(w->seqs);
		pfree(w->noseq);
		pfree(w->cells);
	}
	pfree(w);
}

/*
 * billing_deltas_open
 *		A writer of delta rows: through Citus when billing is distributed,
 *		else straight into the heap.
 */
DeltaWriter *
billing_deltas_open(bool distributed)
{
	CitusWriter *w;

	if (!distributed)
		return heap_open();
	w = palloc0(sizeof(CitusWriter));
	w->pub.add = citus_add;
	w->pub.close = citus_close;
	w->cxt = CurrentMemoryContext;
	return &w->pub;
}
