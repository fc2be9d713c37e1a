/*
 * ingest_claim_direct.c
 *		The direct claim of a batch of event ids: straight into the heap and
 *		the primary-key index of billing.dedupe_keys, the way COPY writes,
 *		inside a subtransaction.
 *
 * Which keys exist already is found by walking the run of claims that
 * holds the batch's first key in the heap (a replayed batch finds its ids
 * there one after another), then, when the last batch was mostly
 * duplicates, by ordered index range scans merged against the sorted ids.
 * The rest are multi-inserted; the unique index flags possible duplicates,
 * which are rechecked.  A concurrent claim of the same id makes the
 * subtransaction roll back, and the caller claims the batch the SQL way
 * (ingest_claim.c), which waits for the other transaction properly.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_collation.h"
#include "executor/executor.h"
#include "nodes/makefuncs.h"
#include "storage/bufmgr.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"

#include "ingest.h"

/* index tuples a merge walk may pass over before it descends the index again */
#define CLAIM_SKIP_LIMIT 64

/* compare an event id (text) with a queued one, in "C" collation order */
static int
event_id_cmp(text *t, const PendingRow *p)
{
	return bytes_cmp(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), p->event_id, p->event_len);
}

/*
 * init_claim_keys
 *		The scan keys of the dedupe_keys primary key: account and meter
 *		equal, the event id compared with id_strategy/id_proc; text in the
 *		"C" collation.  The arguments are set by the caller.
 */
static void
init_claim_keys(ScanKeyData *skey, StrategyNumber id_strategy, RegProcedure id_proc)
{
	ScanKeyInit(&skey[0], 1, BTEqualStrategyNumber, F_INT8EQ, (Datum) 0);
	ScanKeyInit(&skey[1], 2, BTEqualStrategyNumber, F_TEXTEQ, (Datum) 0);
	ScanKeyInit(&skey[2], 3, id_strategy, id_proc, (Datum) 0);
	skey[1].sk_collation = C_COLLATION_OID;
	skey[2].sk_collation = C_COLLATION_OID;
}

/*
 * mark_existing
 *		Set exists[i] for the keys first[0..nkeys) (sorted) that are in
 *		billing.dedupe_keys, committed, ours, or inserted by a transaction
 *		still in progress (then wait for it and look again).
 *
 *		The keys of one (account, meter) are looked up with one ordered
 *		index range scan from the first of them, merged against the sorted
 *		ids: a replayed batch, whose ids are all there, reads each index
 *		entry once instead of descending the index once per id.  Ids are
 *		compared in the index entries; the heap is visited only for an
 *		entry of a batch id (is that row there, or being inserted?).  When the
 *		walk passes more than CLAIM_SKIP_LIMIT entries that are not in the
 *		batch, it descends again at the next id, so sparse batches cost no
 *		more than a lookup per id.
 */
static void
mark_existing(const ClaimQueue *q, const Accum *acc, const int *first, int nkeys,
			  bool *exists, Relation heap, Relation index, MemoryContext tmp)
{
	SnapshotData dirty;
	IndexScanDesc scan;
	TupleTableSlot *slot = table_slot_create(heap, NULL);
	ScanKeyData skey[3];
	int			j = 0;

	InitDirtySnapshot(dirty);
	scan = index_beginscan(heap, index, &dirty, 3, 0);
	scan->xs_want_itup = true;	/* compare ids in the index, visit the heap on a match */
	init_claim_keys(skey, BTGreaterEqualStrategyNumber, F_TEXT_GE);

	while (j < nkeys)
	{
		PendingRow *p0 = &q->pending[first[j]];
		int			g = j + 1;
		int			k = j;
		bool		restart = true;
		bool		have = false;
		int			skipped = 0;
		MemoryContext old;

		/* the keys of this (account, meter) are first[j..g) */
		while (g < nkeys &&
			   q->pending[first[g]].key.account_id == p0->key.account_id &&
			   q->pending[first[g]].key.meter == p0->key.meter)
			g++;

		old = MemoryContextSwitchTo(tmp);
		skey[0].sk_argument = Int64GetDatum(p0->key.account_id);
		skey[1].sk_argument = PointerGetDatum(cstring_to_text(acc->slots[p0->key.meter]->name));
		MemoryContextSwitchTo(old);

		while (k < g)
		{
			PendingRow *p = &q->pending[first[k]];
			TransactionId xwait;
			bool		isnull;
			int			c;

			if (restart)
			{
				old = MemoryContextSwitchTo(tmp);
				skey[2].sk_argument =
					PointerGetDatum(cstring_to_text_with_len(p->event_id, p->event_len));
				MemoryContextSwitchTo(old);
				index_rescan(scan, skey, 3, NULL, 0);
				have = index_getnext_tid(scan, ForwardScanDirection) != NULL;
				skipped = 0;
				restart = false;
			}
			if (!have)
				break;			/* nothing at or after this id: the rest are new */

			c = event_id_cmp(DatumGetTextPP(index_getattr(scan->xs_itup, 3, scan->xs_itupdesc,
														  &isnull)), p);
			if (c == 0)
			{
				/* the id's entry: does it point to a row that is, or may be, there? */
				if (!index_fetch_heap(scan, slot))
				{
					have = index_getnext_tid(scan, ForwardScanDirection) != NULL;
					continue;	/* a dead version: look at the next entry */
				}
				/* our id, claimed by a transaction still in progress: wait, look again */
				xwait = TransactionIdIsValid(dirty.xmin) ? dirty.xmin : dirty.xmax;
				if (TransactionIdIsValid(xwait))
				{
					XactLockTableWait(xwait, heap, &slot->tts_tid, XLTW_InsertIndex);
					restart = true;
					continue;
				}
				exists[k++] = true;
				have = index_getnext_tid(scan, ForwardScanDirection) != NULL;
				skipped = 0;
			}
			else if (c > 0)
				k++;			/* the index is past this id: it is new */
			else if (++skipped > CLAIM_SKIP_LIMIT)
				restart = true;
			else
				have = index_getnext_tid(scan, ForwardScanDirection) != NULL;
		}
		MemoryContextReset(tmp);
		j = g;
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
}

/* what find_claim found */
typedef enum ClaimFound
{
	CLAIM_NONE,					/* no claim of the key */
	CLAIM_LIVE,					/* a claim, committed or made by this transaction */
	CLAIM_BUSY					/* a claim another transaction is making or deleting */
} ClaimFound;

/*
 * find_claim
 *		Look up the claim of a queued key in the dedupe_keys index, with a
 *		dirty snapshot; on CLAIM_LIVE, *found is its TID.  The entry at skip
 *		(our own new claim), when given, is passed over, and so are dead
 *		versions.
 */
static ClaimFound
find_claim(const Accum *acc, Relation heap, Relation index, const PendingRow *p,
		   ItemPointer skip, TupleTableSlot *slot, ItemPointer found)
{
	SnapshotData dirty;
	IndexScanDesc scan;
	ScanKeyData skey[3];
	ItemPointer tid;
	ClaimFound	result = CLAIM_NONE;

	InitDirtySnapshot(dirty);
	init_claim_keys(skey, BTEqualStrategyNumber, F_TEXTEQ);
	skey[0].sk_argument = Int64GetDatum(p->key.account_id);
	skey[1].sk_argument = PointerGetDatum(cstring_to_text(acc->slots[p->key.meter]->name));
	skey[2].sk_argument = PointerGetDatum(cstring_to_text_with_len(p->event_id, p->event_len));
	scan = index_beginscan(heap, index, &dirty, 3, 0);
	index_rescan(scan, skey, 3, NULL, 0);
	while ((tid = index_getnext_tid(scan, ForwardScanDirection)) != NULL)
	{
		if (skip && ItemPointerEquals(tid, skip))
			continue;
		if (!index_fetch_heap(scan, slot))
			continue;
		if (TransactionIdIsValid(dirty.xmin) || TransactionIdIsValid(dirty.xmax))
			result = CLAIM_BUSY;
		else
		{
			*found = slot->tts_tid;
			result = CLAIM_LIVE;
		}
		break;
	}
	index_endscan(scan);
	return result;
}

/* order of a claim row against a queued key, as pending_cmp orders keys */
static int
claim_row_cmp(int64 account, const char *meter, int mlen, const char *id, int idlen,
			  const Accum *acc, const PendingRow *p)
{
	const MeterSlot *m = acc->slots[p->key.meter];
	int			c;

	if (account != p->key.account_id)
		return account < p->key.account_id ? -1 : 1;
	c = bytes_cmp(meter, mlen, m->name, m->namelen);
	if (c != 0)
		return c;
	return bytes_cmp(id, idlen, p->event_id, p->event_len);
}

/* how many rows the heap walk of match_heap_run may pass without a match */
#define HEAP_RUN_MISS_LIMIT 64

/*
 * match_heap_run
 *		Mark exists[] for the keys found by walking the heap of dedupe_keys
 *		forward from the claim of the batch's first key, while its rows come
 *		in key order.  A batch claimed by one multi-insert is such a sorted
 *		run, so a replay of the same data (a retried file) finds its ids
 *		there one after another, without a descent of the index per id.
 *		Stops at the first row out of order, after HEAP_RUN_MISS_LIMIT rows
 *		without a match, or at a row another transaction is inserting or
 *		deleting (the index probe waits for those).  Keys it does not mark
 *		may still exist: the caller checks them through the index.  Returns
 *		the number of keys marked.
 */
static int
match_heap_run(const ClaimQueue *q, const Accum *acc, const int *first, int nkeys,
			   bool *exists, Relation heap, Relation index)
{
	TupleDesc	desc = RelationGetDescr(heap);
	SnapshotData dirty;
	TupleTableSlot *slot;
	ItemPointerData start;
	ClaimFound	found;
	BlockNumber nblocks;
	BlockNumber blk;
	int			k = 0;
	int			misses = 0;
	int			marked = 0;
	bool		stop = false;
	int64		prev_account = PG_INT64_MIN;

	/* 1. the live claim of the first key, through the index */
	slot = table_slot_create(heap, NULL);
	found = find_claim(acc, heap, index, &q->pending[first[0]], NULL, slot, &start);
	ExecDropSingleTupleTableSlot(slot);
	if (found != CLAIM_LIVE)
		return 0;
	InitDirtySnapshot(dirty);

	/* 2. merge the keys with the heap rows that follow it */
	nblocks = RelationGetNumberOfBlocks(heap);
	for (blk = ItemPointerGetBlockNumber(&start); blk < nblocks && !stop && k < nkeys; blk++)
	{
		Buffer		buf = ReadBufferExtended(heap, MAIN_FORKNUM, blk, RBM_NORMAL, NULL);
		Page		page;
		OffsetNumber off;
		OffsetNumber maxoff;

		LockBuffer(buf, BUFFER_LOCK_SHARE);
		page = BufferGetPage(buf);
		maxoff = PageGetMaxOffsetNumber(page);
		off = (blk == ItemPointerGetBlockNumber(&start))
			? ItemPointerGetOffsetNumber(&start) : FirstOffsetNumber;
		for (; off <= maxoff && !stop && k < nkeys; off++)
		{
			ItemId		lp = PageGetItemId(page, off);
			HeapTupleData tup;
			Datum		a,
						m,
						e;
			bool		n1,
						n2,
						n3;
			int			c;

			if (!ItemIdIsNormal(lp))
				continue;
			tup.t_data = (HeapTupleHeader) PageGetItem(page, lp);
			tup.t_len = ItemIdGetLength(lp);
			tup.t_tableOid = RelationGetRelid(heap);
			ItemPointerSet(&tup.t_self, blk, off);
			if (!HeapTupleSatisfiesVisibility(&tup, &dirty, buf))
				continue;		/* a dead claim */
			if (TransactionIdIsValid(dirty.xmin) || TransactionIdIsValid(dirty.xmax))
			{
				stop = true;	/* being inserted or deleted: leave it to the index */
				break;
			}
			a = heap_getattr(&tup, 1, desc, &n1);
			m = heap_getattr(&tup, 2, desc, &n2);
			e = heap_getattr(&tup, 3, desc, &n3);
			if (n1 || n2 || n3 ||
				VARATT_IS_COMPRESSED(DatumGetPointer(m)) || VARATT_IS_EXTERNAL(DatumGetPointer(m)) ||
				VARATT_IS_COMPRESSED(DatumGetPointer(e)) || VARATT_IS_EXTERNAL(DatumGetPointer(e)) ||
				DatumGetInt64(a) < prev_account)
			{
				stop = true;	/* not a run of claims in key order */
				break;
			}
			prev_account = DatumGetInt64(a);
			for (;;)
			{
				PendingRow *p = &q->pending[first[k]];

				c = claim_row_cmp(DatumGetInt64(a),
								  VARDATA_ANY(DatumGetPointer(m)), VARSIZE_ANY_EXHDR(DatumGetPointer(m)),
								  VARDATA_ANY(DatumGetPointer(e)), VARSIZE_ANY_EXHDR(DatumGetPointer(e)),
								  acc, p);
				if (c > 0)
				{
					/* this key is not in the run (it may be elsewhere) */
					if (++k == nkeys || ++misses > HEAP_RUN_MISS_LIMIT)
						break;
					continue;
				}
				if (c == 0)
				{
					exists[k++] = true;
					marked++;
					misses = 0;
				}
				else if (++misses > HEAP_RUN_MISS_LIMIT)
					stop = true;	/* rows not in the batch: the run is over */
				break;
			}
			if (misses > HEAP_RUN_MISS_LIMIT)
				stop = true;
		}
		UnlockReleaseBuffer(buf);
	}
	return marked;
}

/*
 * billing_claim_direct
 *		The fast way to claim keys, inside a subtransaction, in one of two
 *		ways:
 *		- when the last batch was mostly duplicates: probe the primary key
 *		  index for each (sorted) key, then multi-insert the new ones;
 *		- otherwise (new data): multi-insert every key at once, asking the
 *		  unique index only to report possible duplicates, then recheck
 *		  those and delete our rows that turn out to be duplicates.  This
 *		  saves the probe, one descent of the index per key.
 *		Another transaction claiming one of the keys at the same time makes
 *		the unique index (or the recheck) raise unique_violation; then the
 *		subtransaction is rolled back and false returned, and the caller
 *		claims the batch the slow way.
 */
bool
billing_claim_direct(ClaimQueue *q, const Accum *acc, const int *first, int nkeys,
					 bool *won)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool ok = true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		Relation	heap = table_open(billing_relid("dedupe_keys"), RowExclusiveLock);
		Relation	index = index_open(billing_relid("dedupe_keys_pkey"), RowExclusiveLock);
		EState	   *estate = CreateExecutorState();
		ResultRelInfo *rri = makeNode(ResultRelInfo);
		TupleTableSlot **slots = palloc(WRITE_BATCH * sizeof(TupleTableSlot *));
		CommandId	cid = GetCurrentCommandId(true);
		int			nslots = 0;
		int			j;
		MemoryContext tmp = AllocSetContextCreate(oldcontext, "billing claim",
												  ALLOCSET_DEFAULT_SIZES);
		bool	   *exists = palloc0(Max(nkeys, 1) * sizeof(bool));
		bool		insert_first = !q->dup_heavy;
		int		   *slotkey = palloc(WRITE_BATCH * sizeof(int));
		int		   *flagged = palloc(Max(nkeys, 1) * sizeof(int));
		ItemPointerData *flagged_tid = palloc(Max(nkeys, 1) * sizeof(ItemPointerData));
		int			nflagged = 0;
		int			ndups = 0;

		InitResultRelInfo(rri, heap, 1, NULL, 0);
		ExecOpenIndices(rri, false);
		for (j = 0; j < WRITE_BATCH; j++)
			slots[j] = table_slot_create(heap, NULL);

		/*
		 * 1. which keys exist already: those in the run of claims that
		 * holds the first key (a replay), then, unless inserting first,
		 * the others through the index
		 */
		if (nkeys > 0 && match_heap_run(q, acc, first, nkeys, exists, heap, index) < nkeys &&
			!insert_first)
		{
			int		   *rest = palloc(nkeys * sizeof(int));
			int		   *restpos = palloc(nkeys * sizeof(int));
			bool	   *restexists = palloc0(nkeys * sizeof(bool));
			int			nrest = 0;

			for (j = 0; j < nkeys; j++)
				if (!exists[j])
				{
					restpos[nrest] = j;
					rest[nrest++] = first[j];
				}
			mark_existing(q, acc, rest, nrest, restexists, heap, index, tmp);
			for (j = 0; j < nrest; j++)
				exists[restpos[j]] = restexists[j];
			pfree(rest);
			pfree(restpos);
			pfree(restexists);
		}

		/* 2. multi-insert the others */
		for (j = 0; j <= nkeys; j++)
		{
			if (j < nkeys && !exists[j])
			{
				PendingRow *p = &q->pending[first[j]];
				MeterSlot  *m = acc->slots[p->key.meter];
				MemoryContext old = MemoryContextSwitchTo(tmp);
				TupleTableSlot *ts = slots[nslots++];

				ExecClearTuple(ts);
				ts->tts_values[0] = Int64GetDatum(p->key.account_id);
				ts->tts_values[1] = PointerGetDatum(cstring_to_text(m->name));
				ts->tts_values[2] = PointerGetDatum(cstring_to_text_with_len(p->event_id, p->event_len));
				ts->tts_values[3] = TimestampTzGetDatum(m->expires);
				memset(ts->tts_isnull, 0, 4 * sizeof(bool));
				ExecStoreVirtualTuple(ts);
				MemoryContextSwitchTo(old);
				slotkey[nslots - 1] = j;
				won[j] = true;
			}
			if (nslots > 0 && (nslots == WRITE_BATCH || j == nkeys))
			{
				int			i;

				table_multi_insert(heap, slots, nslots, cid, 0, NULL);
				for (i = 0; i < nslots; i++)
				{
					List	   *conflicts = ExecInsertIndexTuples(rri, slots[i], estate, false,
																  insert_first, NULL, NIL);

					if (conflicts != NIL)
					{
						flagged[nflagged] = slotkey[i];
						flagged_tid[nflagged++] = slots[i]->tts_tid;
						list_free(conflicts);
					}
				}
				nslots = 0;
				MemoryContextReset(tmp);
			}
		}
		CommandCounterIncrement();

		/* 3. keys the index flagged: a duplicate drops our row */
		if (nflagged > 0)
		{
			TupleTableSlot *probe = table_slot_create(heap, NULL);

			for (j = 0; j < nflagged; j++)
			{
				PendingRow *p = &q->pending[first[flagged[j]]];
				MemoryContext old = MemoryContextSwitchTo(tmp);
				ItemPointerData other;
				ClaimFound	found = find_claim(acc, heap, index, p, &flagged_tid[j], probe, &other);

				MemoryContextSwitchTo(old);
				MemoryContextReset(tmp);

				/*
				 * Another transaction's claim in progress: the slow path
				 * (INSERT ... ON CONFLICT) waits for it properly.
				 */
				if (found == CLAIM_BUSY)
					ereport(ERROR,
							(errcode(ERRCODE_UNIQUE_VIOLATION),
							 errmsg("event id is being claimed by another transaction")));
				if (found == CLAIM_LIVE)
				{
					simple_heap_delete(heap, &flagged_tid[j]);
					won[flagged[j]] = false;
				}
			}
			ExecDropSingleTupleTableSlot(probe);
			CommandCounterIncrement();
		}

		/* which way the next batch goes */
		for (j = 0; j < nkeys; j++)
			ndups += !won[j];
		q->dup_heavy = (ndups > nkeys / 4);

		pfree(exists);
		pfree(slotkey);
		pfree(flagged);
		pfree(flagged_tid);
		for (j = 0; j < WRITE_BATCH; j++)
			ExecDropSingleTupleTableSlot(slots[j]);
		ExecCloseIndices(rri);
		FreeExecutorState(estate);
		index_close(index, NoLock);
		table_close(heap, NoLock);
		MemoryContextDelete(tmp);
		pfree(slots);

		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		if (edata->sqlerrcode != ERRCODE_UNIQUE_VIOLATION)
			ReThrowError(edata);
		FreeErrorData(edata);
		memset(won, 0, nkeys * sizeof(bool));
		ok = false;
	}
	PG_END_TRY();
	return ok;
}
