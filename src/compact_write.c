/*
 * compact_write.c
 *		The rows of usage_days written, one way or the other.
 *
 * On one node (and into a shard of usage_days, on its node), straight into
 * the heap and primary key: new rows multi-inserted as COPY does,
 * HEAP_CHUNK at a time, existing ones updated in place (with index entries
 * unless the new version stays on its page as a heap-only tuple).  On a
 * Citus coordinator in a transaction block, where usage_days is a shell,
 * the rows are collected in parallel arrays and written by one INSERT ...
 * ON CONFLICT DO UPDATE over their unnest per WRITE_CHUNK rows, which Citus
 * routes to the shards.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/memutils.h"
#include "utils/rel.h"

#include "catalog.h"
#include "compact.h"

/* new rows of usage_days multi-inserted at a time (heap path) */
#define HEAP_CHUNK		1000

/* make room for n more rows to write */
void
billing_compact_out_reserve(Compaction *cp, int cap)
{
	MemoryContext old = MemoryContextSwitchTo(cp->batch_cxt);

	cp->o_account = palloc(cap * sizeof(Datum));
	cp->o_meter = palloc(cap * sizeof(Datum));
	cp->o_day = palloc(cap * sizeof(Datum));
	cp->o_dim = palloc(cap * sizeof(Datum));
	cp->o_qty = palloc(cap * sizeof(Datum));
	cp->o_events = palloc(cap * sizeof(Datum));
	cp->o_ts = palloc(cap * sizeof(Datum));
	cp->o_seq = palloc(cap * sizeof(Datum));
	cp->o_cells = palloc(cap * sizeof(Datum));
	cp->o_ts_null = palloc(cap * sizeof(bool));
	cp->o_seq_null = palloc(cap * sizeof(bool));
	cp->nout = 0;
	MemoryContextSwitchTo(old);
}

/* a one-dimensional array of n values */
Datum
billing_compact_array(Datum *values, bool *nulls, int n, Oid type, int len, bool byval,
					  char align)
{
	int			dims[1] = {n};
	int			lbs[1] = {1};

	return PointerGetDatum(construct_md_array(values, nulls, 1, dims, lbs, type, len, byval,
											  align));
}

/*
 * billing_compact_out_flush
 *		Write the rows collected: one upsert of their arrays.
 */
void
billing_compact_out_flush(Compaction *cp)
{
	Datum		args[9];
	Oid			types[9] = {INT8ARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID, TEXTARRAYOID,
	NUMERICARRAYOID, INT8ARRAYOID, TIMESTAMPTZARRAYOID, INT8ARRAYOID, BYTEAARRAYOID};
	int			ret;
	int			n = cp->nout;
	MemoryContext old;

	if (n == 0)
		return;
	old = MemoryContextSwitchTo(cp->batch_cxt);
	args[0] = billing_compact_array(cp->o_account, NULL, n, INT8OID, 8, true, TYPALIGN_DOUBLE);
	args[1] = billing_compact_array(cp->o_meter, NULL, n, TEXTOID, -1, false, TYPALIGN_INT);
	args[2] = billing_compact_array(cp->o_day, NULL, n, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE);
	args[3] = billing_compact_array(cp->o_dim, NULL, n, TEXTOID, -1, false, TYPALIGN_INT);
	args[4] = billing_compact_array(cp->o_qty, NULL, n, NUMERICOID, -1, false, TYPALIGN_INT);
	args[5] = billing_compact_array(cp->o_events, NULL, n, INT8OID, 8, true, TYPALIGN_DOUBLE);
	args[6] = billing_compact_array(cp->o_ts, cp->o_ts_null, n, TIMESTAMPTZOID, 8, true,
									TYPALIGN_DOUBLE);
	args[7] = billing_compact_array(cp->o_seq, cp->o_seq_null, n, INT8OID, 8, true,
									TYPALIGN_DOUBLE);
	args[8] = billing_compact_array(cp->o_cells, NULL, n, BYTEAOID, -1, false, TYPALIGN_INT);
	MemoryContextSwitchTo(old);
	ret = SPI_execute_with_args("INSERT INTO billing.usage_days AS u (account_id, meter, day, "
								"dimension, quantity, events, last_ts, last_seq, cells) "
								"SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9) "
								"ON CONFLICT (account_id, meter, day, dimension) DO UPDATE "
								"SET quantity = excluded.quantity, events = excluded.events, "
								"last_ts = excluded.last_ts, last_seq = excluded.last_seq, "
								"cells = excluded.cells",
								9, types, args, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "writing billing.usage_days failed: %s", SPI_result_code_string(ret));
	cp->nout = 0;
}

/* open usage_days (or a shard of it) for writing straight into its heap and indexes */
StoreHeap *
billing_compact_heap_begin(Oid days_rel)
{
	StoreHeap  *h = palloc0(sizeof(StoreHeap));

	h->rel = table_open(days_rel, RowExclusiveLock);
	if (RelationGetDescr(h->rel)->natts != STORE_NATTS)
		elog(ERROR, "billing.usage_days does not have the columns compaction writes");
	h->estate = CreateExecutorState();
	h->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(h->rri, h->rel, 1, NULL, 0);
	ExecOpenIndices(h->rri, false);
	if (h->rri->ri_NumIndices == 1)
	{
		IndexInfo  *ii = h->rri->ri_IndexRelationInfo[0];

		h->key_only = h->rri->ri_IndexRelationDescs[0]->rd_index->indisprimary &&
			ii->ii_ReadyForInserts && ii->ii_Expressions == NIL &&
			ii->ii_Predicate == NIL && ii->ii_ExclusionOps == NULL;
	}
	/* new rows' slots: an unpinned copy of the descriptor (ingest_deltas.c) */
	h->desc = CreateTupleDescCopy(RelationGetDescr(h->rel));
	h->slots = palloc(HEAP_CHUNK * sizeof(TupleTableSlot *));
	for (int i = 0; i < HEAP_CHUNK; i++)
		h->slots[i] = NULL;
	h->upd_slot = MakeSingleTupleTableSlot(RelationGetDescr(h->rel), &TTSOpsHeapTuple);
	h->cid = GetCurrentCommandId(true);
	h->cxt = CurrentMemoryContext;
	return h;
}

/* multi-insert the queued new rows and their index entries */
void
billing_compact_heap_flush(StoreHeap *h)
{
	if (h->n == 0)
		return;
	table_multi_insert(h->rel, h->slots, h->n, h->cid, 0, NULL);
	for (int i = 0; i < h->n; i++)
	{
		List	   *r = ExecInsertIndexTuples(h->rri, h->slots[i], h->estate,
											  false, false, NULL, NIL);

		list_free(r);
		ExecClearTuple(h->slots[i]);
	}
	ResetPerTupleExprContext(h->estate);
	h->n = 0;
}

/* write the rest and close */
void
billing_compact_heap_end(StoreHeap *h)
{
	billing_compact_heap_flush(h);
	for (int i = 0; i < HEAP_CHUNK; i++)
		if (h->slots[i] != NULL)
			ExecDropSingleTupleTableSlot(h->slots[i]);
	ExecDropSingleTupleTableSlot(h->upd_slot);
	FreeTupleDesc(h->desc);
	ExecCloseIndices(h->rri);
	FreeExecutorState(h->estate);
	table_close(h->rel, NoLock);
}

/*
 * billing_compact_heap_write
 *		Write one row of usage_days: replace the row at old (an update, with
 *		index entries unless it stays on its page as a heap-only tuple) or
 *		queue a new one.
 */
void
billing_compact_heap_write(StoreHeap *h, Datum *values, bool *nulls, const OldRow *old)
{
	if (old != NULL)
	{
		HeapTuple	tup = heap_form_tuple(RelationGetDescr(h->rel), values, nulls);
		ItemPointerData otid = old->tid;

		simple_heap_update(h->rel, &otid, tup);
		if (!HeapTupleIsHeapOnly(tup))
		{
			ExecStoreHeapTuple(tup, h->upd_slot, false);
			if (h->key_only)
			{
				/*
				 * The new version keeps the key of the row it replaces,
				 * which this compaction (one at a time, under its
				 * lock) found live: it cannot duplicate a key, so the entry
				 * goes in without the unique check, which would visit the
				 * old version in the heap and, on a full page, try to delete
				 * the entries of the versions this same transaction is
				 * replacing.
				 */
				Datum		kv[INDEX_MAX_KEYS];
				bool		kn[INDEX_MAX_KEYS];

				FormIndexDatum(h->rri->ri_IndexRelationInfo[0], h->upd_slot, h->estate, kv, kn);
				index_insert(h->rri->ri_IndexRelationDescs[0], kv, kn, &tup->t_self, h->rel,
							 UNIQUE_CHECK_NO, false, h->rri->ri_IndexRelationInfo[0]);
			}
			else
			{
				/* not as an UPDATE: that would look for the updated columns in a range table */
				list_free(ExecInsertIndexTuples(h->rri, h->upd_slot, h->estate,
												false, false, NULL, NIL));
			}
			ExecClearTuple(h->upd_slot);
		}
		heap_freetuple(tup);
		return;
	}
	if (h->slots[h->n] == NULL)
	{
		MemoryContext oldcxt = MemoryContextSwitchTo(h->cxt);

		h->slots[h->n] = MakeSingleTupleTableSlot(h->desc, table_slot_callbacks(h->rel));
		MemoryContextSwitchTo(oldcxt);
	}
	ExecClearTuple(h->slots[h->n]);
	memcpy(h->slots[h->n]->tts_values, values, STORE_NATTS * sizeof(Datum));
	memcpy(h->slots[h->n]->tts_isnull, nulls, STORE_NATTS * sizeof(bool));
	ExecStoreVirtualTuple(h->slots[h->n]);
	if (++h->n == HEAP_CHUNK)
		billing_compact_heap_flush(h);
}
