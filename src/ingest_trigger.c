/*
 * ingest_trigger.c
 *		The triggers billing.meter_table puts on a metered table, the
 *		accumulators they fill, and the transaction callbacks that keep
 *		those accumulators honest.
 *
 * A statement's rows are accumulated from its first row (BEFORE ROW
 * trigger billing_meter_row) until its AFTER STATEMENT trigger
 * billing_meter_flush writes them.  One accumulator is kept per
 * subtransaction, innermost first, in TopTransactionContext: a
 * subtransaction that aborts drops exactly the reports it made, one that
 * commits hands its accumulator to its parent, and a commit that would
 * leave a report unflushed (a disabled flush trigger) is refused.
 *
 * The triggers fire on users' own tables and are not SECURITY DEFINER
 * (SPEC section 8): they run as the role that inserts.  What needs the
 * extension's rights (reading billing.meters and billing.accounts,
 * claiming event ids, writing deltas) switches to the extension owner with
 * search_path pinned, inside the functions that do it (billing_owner_begin
 * in catalog.c), and switches back before the trigger returns.
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/copy.h"
#include "commands/copyfrom_internal.h"
#include "commands/progress.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/tuplestore.h"

#include "billing.h"
#include "ingest.h"

PG_FUNCTION_INFO_V1(billing_meter_row);
PG_FUNCTION_INFO_V1(billing_meter_after_rows);
PG_FUNCTION_INFO_V1(billing_meter_flush);

/* cached column numbers of one metered table's trigger */
typedef struct TableConf
{
	Oid			tgoid;
	AttrNumber	account_att;
	AttrNumber	meter_att;
	AttrNumber	qty_att;
	AttrNumber	ts_att;
	AttrNumber	event_att;		/* 0: none */
	AttrNumber	dim_att;		/* 0: none */
	Oid			qty_type;
	bool		keep_rows;
} TableConf;

/*
 * The accumulator of one subtransaction's metered statements, with the
 * tables it has seen; lives in the accumulator's memory.
 */
typedef struct TriggerState
{
	IngestState *st;
	SubTransactionId subid;		/* owner */
	struct TriggerState *next;	/* the enclosing subtransactions' */
	TableConf  *tables;
	int			ntables;
} TriggerState;

/* trigger accumulators of the current transaction, innermost first */
static TriggerState *trigger_states = NULL;

/*
 * state_is_empty
 *		Has the accumulator nothing left to write?
 */
static bool
state_is_empty(IngestState *st)
{
	return st->acc.buckets->members == 0 && st->acc.nahead == 0 &&
		st->claims.npending == 0 && st->runs.nruns == 0;
}

/*
 * ingest_xact_cb
 *		Refuse to commit (or prepare) with usage counted but not written;
 *		forget the accumulators when the transaction ends.
 */
static void
ingest_xact_cb(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PARALLEL_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			{
				TriggerState *ts;

				for (ts = trigger_states; ts; ts = ts->next)
					if (!state_is_empty(ts->st))
						ereport(ERROR,
								(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
								 errmsg("usage counted by a metered table was not flushed"),
								 errdetail("The statement-level trigger billing_meter_flush did not run."),
								 errhint("Do not disable the triggers that billing.meter_table creates.")));
			}
			break;
		default:
			/* commit or abort: the memory goes with TopTransactionContext */
			trigger_states = NULL;
			break;
	}
}

/*
 * ingest_subxact_cb
 *		A subtransaction that aborts drops its accumulators; one that
 *		commits hands them to its parent.
 */
static void
ingest_subxact_cb(SubXactEvent event, SubTransactionId mySubid,
				  SubTransactionId parentSubid, void *arg)
{
	TriggerState *ts;

	switch (event)
	{
		case SUBXACT_EVENT_ABORT_SUB:
			/* drop the reports the aborted subtransaction made */
			while (trigger_states && trigger_states->subid == mySubid)
			{
				ts = trigger_states;
				trigger_states = ts->next;
				MemoryContextDelete(ts->st->ctx);
			}
			break;
		case SUBXACT_EVENT_COMMIT_SUB:
			for (ts = trigger_states; ts && ts->subid == mySubid; ts = ts->next)
				ts->subid = parentSubid;
			break;
		default:
			break;
	}
}

/*
 * billing_ingest_init
 *		Register the transaction callbacks (from _PG_init).
 */
void
billing_ingest_init(void)
{
	RegisterXactCallback(ingest_xact_cb, NULL);
	RegisterSubXactCallback(ingest_subxact_cb, NULL);
}

/*
 * current_trigger_state
 *		The accumulator of the current subtransaction, created on demand.
 */
static TriggerState *
current_trigger_state(void)
{
	SubTransactionId subid = GetCurrentSubTransactionId();
	IngestState *st;
	TriggerState *ts;

	if (trigger_states && trigger_states->subid == subid)
		return trigger_states;
	st = billing_ingest_create(TopTransactionContext, 1024);
	ts = MemoryContextAllocZero(st->ctx, sizeof(TriggerState));
	ts->st = st;
	ts->subid = subid;
	ts->next = trigger_states;
	trigger_states = ts;
	return ts;
}

/*
 * trigger_data
 *		The TriggerData of a call of the trigger function fn, which must have
 *		been fired by the trigger manager; raises 39P01 otherwise.
 */
static TriggerData *
trigger_data(FunctionCallInfo fcinfo, const char *fn)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("function \"%s\" was not called by trigger manager", fn),
				 errhint("billing.meter_table creates the triggers that call it.")));
	return (TriggerData *) fcinfo->context;
}

/*
 * wrong_firing
 *		Raise 39P01: trigger function fn was fired at another event or
 *		level than how, the one it works at.
 */
static void
wrong_firing(TriggerData *td, const char *fn, const char *how)
{
	ereport(ERROR,
			(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
			 errmsg("function \"%s\" must be fired %s", fn, how),
			 errdetail("Trigger \"%s\" on table \"%s\" fires it otherwise.",
					   td->tg_trigger->tgname, RelationGetRelationName(td->tg_relation)),
			 errhint("billing.meter_table creates the triggers that call it.")));
}

/*
 * check_column_type
 *		The type of column att, read as kind (0 account, 1 meter, 2
 *		quantity, 3 timestamp, 4 event id, 5 dimension), must be one
 *		billing.meter_table accepts: the table's owner may have retyped it
 *		since (ALTER TABLE ... TYPE), and the values are read as those types.
 *		42804 otherwise.
 */
static void
check_column_type(Relation rel, Form_pg_attribute att, int kind)
{
	static const char *const kinds[6] = {"account", "meter", "quantity", "timestamp",
	"event id", "dimension"};
	Oid			t = att->atttypid;
	bool		ok;

	switch (kind)
	{
		case 0:
			ok = (t == INT8OID || t == INT4OID || t == INT2OID);
			break;
		case 2:
			ok = (t == NUMERICOID || t == INT8OID || t == INT4OID || t == INT2OID);
			break;
		case 3:
			ok = (t == TIMESTAMPTZOID);
			break;
		default:
			ok = (t == TEXTOID || t == VARCHAROID);
			break;
	}
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("%s column \"%s\" of metered table \"%s\" has type %s",
						kinds[kind], NameStr(att->attname), RelationGetRelationName(rel),
						format_type_be(t)),
				 errdetail("billing.meter_table accepts %s.",
						   kind == 0 ? "bigint, integer or smallint" :
						   kind == 2 ? "numeric, bigint, integer or smallint" :
						   kind == 3 ? "timestamp with time zone" : "text or character varying"),
				 errhint("Change the column back, or run billing.unmeter_table and billing.meter_table again.")));
}

/*
 * table_conf
 *		Column numbers of a metered table's trigger tg on rel, resolved once
 *		per accumulator.  Trigger arguments: account, meter, quantity, ts,
 *		event id ('' if none), dimension ('' if none), keep_rows ('t'/'f').
 */
static TableConf *
table_conf(TriggerState *ts, Trigger *tg, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	TableConf  *c;
	int			i;
	AttrNumber *atts[6];
	MemoryContext old;

	for (i = 0; i < ts->ntables; i++)
		if (ts->tables[i].tgoid == tg->tgoid)
			return &ts->tables[i];

	if (tg->tgnargs != 7)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trigger \"%s\" on table \"%s\" must pass 7 arguments, not %d",
						tg->tgname, RelationGetRelationName(rel), tg->tgnargs),
				 errhint("billing.meter_table creates the triggers of metered tables.")));

	old = MemoryContextSwitchTo(ts->st->ctx);
	ts->tables = ts->tables ? repalloc(ts->tables, (ts->ntables + 1) * sizeof(TableConf))
		: palloc(sizeof(TableConf));
	MemoryContextSwitchTo(old);
	c = &ts->tables[ts->ntables];
	memset(c, 0, sizeof(*c));
	c->tgoid = tg->tgoid;
	atts[0] = &c->account_att;
	atts[1] = &c->meter_att;
	atts[2] = &c->qty_att;
	atts[3] = &c->ts_att;
	atts[4] = &c->event_att;
	atts[5] = &c->dim_att;
	for (i = 0; i < 6; i++)
	{
		const char *col = tg->tgargs[i];

		*atts[i] = 0;
		if (col[0] == '\0')
			continue;
		for (int a = 0; a < desc->natts; a++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, a);

			if (!att->attisdropped && strcmp(NameStr(att->attname), col) == 0)
			{
				*atts[i] = att->attnum;
				if (i == 2)
					c->qty_type = att->atttypid;
				check_column_type(rel, att, i);
				break;
			}
		}
		if (*atts[i] == 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" of metered table \"%s\" does not exist",
							col, RelationGetRelationName(rel)),
					 errhint("Run billing.meter_table again after renaming or dropping columns.")));
	}
	c->keep_rows = (tg->tgargs[6][0] == 't');
	ts->ntables++;
	return c;
}

/*
 * meter_slot
 *		Read a metered row's columns from slot and pass it to billing_report in
 *		mode.
 */
static ReportResult
meter_slot(IngestState *st, TableConf *c, TupleTableSlot *slot, Relation rel, ReportMode mode)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Datum		account,
				meter,
				qty,
				ts;
	bool		n1,
				n2,
				n3,
				n4;
	const char *mstr,
			   *estr = NULL,
			   *dstr = "";
	int			mlen,
				elen = 0,
				dlen = 0;
	int64		account_id;
	int			natts = Max(Max(c->account_att, c->meter_att), Max(c->qty_att, c->ts_att));

	/* deform the row once, up to the last column read */
	natts = Max(natts, Max(c->event_att, c->dim_att));
	slot_getsomeattrs(slot, natts);
	account = slot->tts_values[c->account_att - 1];
	n1 = slot->tts_isnull[c->account_att - 1];
	meter = slot->tts_values[c->meter_att - 1];
	n2 = slot->tts_isnull[c->meter_att - 1];
	qty = slot->tts_values[c->qty_att - 1];
	n3 = slot->tts_isnull[c->qty_att - 1];
	ts = slot->tts_values[c->ts_att - 1];
	n4 = slot->tts_isnull[c->ts_att - 1];
	if (n1 || n2 || n3 || n4)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s of a metered row must not be null",
						n1 ? "account" : n2 ? "meter" : n3 ? "quantity" : "timestamp"),
				 errdetail("Table \"%s\".", RelationGetRelationName(rel))));

	switch (TupleDescAttr(desc, c->account_att - 1)->atttypid)
	{
		case INT2OID:
			account_id = DatumGetInt16(account);
			break;
		case INT4OID:
			account_id = DatumGetInt32(account);
			break;
		default:
			account_id = DatumGetInt64(account);
			break;
	}
	billing_text_bytes(meter, &mstr, &mlen);
	if (c->event_att)
	{
		if (!slot->tts_isnull[c->event_att - 1])
			billing_text_bytes(slot->tts_values[c->event_att - 1], &estr, &elen);
	}
	if (c->dim_att)
	{
		if (!slot->tts_isnull[c->dim_att - 1])
			billing_text_bytes(slot->tts_values[c->dim_att - 1], &dstr, &dlen);
	}

	return billing_report(st, account_id, mstr, mlen, qty, c->qty_type,
						  DatumGetTimestampTz(ts), estr, elen, dstr, dlen, mode);
}

/* meter_slot for the row a row trigger fired for */
static ReportResult
meter_tuple(IngestState *st, TableConf *c, TriggerData *td, ReportMode mode)
{
	return meter_slot(st, c, td->tg_trigslot, td->tg_relation, mode);
}

/*
 * flush_statement
 *		Write what the current subtransaction's metered statements counted:
 *		the work of billing_meter_flush, at the end of a statement.
 */
static void
flush_statement(void)
{
	SubTransactionId subid = GetCurrentSubTransactionId();
	TriggerState *ts;

	for (ts = trigger_states; ts && ts->subid == subid; ts = ts->next)
	{
		billing_flush(ts->st);
		billing_forget_accounts(&ts->st->known);
	}
}

/*
 * billing_meter_row
 *		BEFORE INSERT FOR EACH ROW trigger of a metered table.  With
 *		keep_rows false it counts the row and drops it (returns NULL).  With
 *		keep_rows true it only claims the row's event id: a duplicate is
 *		dropped, any other row is stored and counted by the AFTER STATEMENT
 *		trigger over the inserted rows, so that a row skipped later
 *		(INSERT ... ON CONFLICT DO NOTHING, another BEFORE trigger) is not
 *		counted.
 */
Datum
billing_meter_row(PG_FUNCTION_ARGS)
{
	TriggerData *td = trigger_data(fcinfo, "billing._meter_row");
	TriggerState *ts;
	TableConf  *c;
	ReportResult r;

	if (!TRIGGER_FIRED_BEFORE(td->tg_event) || !TRIGGER_FIRED_FOR_ROW(td->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(td->tg_event))
		wrong_firing(td, "billing._meter_row", "BEFORE INSERT FOR EACH ROW");

	ts = current_trigger_state();
	c = table_conf(ts, td->tg_trigger, td->tg_relation);
	r = meter_tuple(ts->st, c, td, c->keep_rows ? MODE_CLAIM_ONLY : MODE_QUEUE);
	billing_flush_if_full(ts->st);

	if (c->keep_rows && r == REPORT_COUNTED)
		return PointerGetDatum(td->tg_trigtuple);
	return PointerGetDatum(NULL);
}

/*
 * billing_meter_after_rows
 *		AFTER INSERT FOR EACH STATEMENT trigger of a metered table with
 *		keep_rows, with the statement's inserted rows as its transition
 *		table: counts each row actually stored (its event id was claimed by
 *		the BEFORE ROW trigger).  It fires before billing_meter_flush (AFTER
 *		STATEMENT triggers fire in name order), which writes the counts.
 *		The transition table spills to disk beyond work_mem, so a large COPY
 *		queues nothing per row in memory.
 */
Datum
billing_meter_after_rows(PG_FUNCTION_ARGS)
{
	TriggerData *td = trigger_data(fcinfo, "billing._meter_after_rows");
	TriggerState *ts;
	TableConf  *c;
	TupleTableSlot *slot;
	MemoryContext rowcxt;
	int			ptr;

	if (!TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_STATEMENT(td->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(td->tg_event) || td->tg_newtable == NULL)
		wrong_firing(td, "billing._meter_after_rows",
					 "AFTER INSERT FOR EACH STATEMENT with a transition table (REFERENCING NEW TABLE)");

	ts = current_trigger_state();
	c = table_conf(ts, td->tg_trigger, td->tg_relation);
	slot = MakeSingleTupleTableSlot(RelationGetDescr(td->tg_relation), &TTSOpsMinimalTuple);
	/* a read pointer of our own, from the start */
	ptr = tuplestore_alloc_read_pointer(td->tg_newtable, EXEC_FLAG_REWIND);
	tuplestore_select_read_pointer(td->tg_newtable, ptr);
	tuplestore_rescan(td->tg_newtable);
	/* what reading one row allocates (detoasted values) is freed with it */
	rowcxt = AllocSetContextCreate(CurrentMemoryContext, "billing metered row",
								   ALLOCSET_DEFAULT_SIZES);
	while (tuplestore_gettupleslot(td->tg_newtable, true, false, slot))
	{
		MemoryContext old = MemoryContextSwitchTo(rowcxt);

		(void) meter_slot(ts->st, c, slot, td->tg_relation, MODE_COUNT_ONLY);
		billing_flush_if_full(ts->st);
		MemoryContextSwitchTo(old);
		MemoryContextReset(rowcxt);
	}
	MemoryContextDelete(rowcxt);
	tuplestore_select_read_pointer(td->tg_newtable, 0);
	ExecDropSingleTupleTableSlot(slot);
	return PointerGetDatum(NULL);
}

/*
 * billing_meter_flush
 *		AFTER INSERT FOR EACH STATEMENT trigger of a metered table: writes
 *		what the statement counted.
 */
Datum
billing_meter_flush(PG_FUNCTION_ARGS)
{
	TriggerData *td = trigger_data(fcinfo, "billing._meter_flush");

	if (!TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_STATEMENT(td->tg_event))
		wrong_firing(td, "billing._meter_flush", "AFTER ... FOR EACH STATEMENT");

	flush_statement();
	return PointerGetDatum(NULL);
}

/*
 * copy_context_push
 *		Have errors carry COPY's context (the line), as COPY's own do.
 */
static void
copy_context_push(ErrorContextCallback *cb, CopyFromState cstate)
{
	cb->callback = CopyFromErrorCallback;
	cb->arg = (void *) cstate;
	cb->previous = error_context_stack;
	error_context_stack = cb;
}

/*
 * next_copy_row
 *		COPY's next row into slot (a virtual slot), parsed in estate's
 *		per-tuple memory, which it resets first and leaves current; false
 *		at the end of the input.
 */
static bool
next_copy_row(CopyFromState cstate, EState *estate, TupleTableSlot *slot)
{
	CHECK_FOR_INTERRUPTS();
	ResetPerTupleExprContext(estate);
	MemoryContextSwitchTo(GetPerTupleMemoryContext(estate));
	ExecClearTuple(slot);
	if (!NextCopyFrom(cstate, GetPerTupleExprContext(estate), slot->tts_values, slot->tts_isnull))
		return false;
	ExecStoreVirtualTuple(slot);
	return true;
}

/*
 * billing_meter_copy
 *		The rows of a COPY FROM into a metered table whose triggers would
 *		only count them and drop them (keep_rows false; see ingest_copy.c),
 *		counted without firing the triggers: what billing_meter_row does for
 *		each row and billing_meter_flush at the end, on the values COPY
 *		parsed, without forming each row into a heap tuple for a trigger
 *		call.  Errors carry COPY's context (the line).
 */
void
billing_meter_copy(Relation rel, Trigger *row_trigger, CopyFromState cstate)
{
	TriggerState *ts = current_trigger_state();
	TableConf  *c = table_conf(ts, row_trigger, rel);
	EState	   *estate = CreateExecutorState();
	TupleTableSlot *slot = MakeSingleTupleTableSlot(RelationGetDescr(rel), &TTSOpsVirtual);
	ErrorContextCallback errcallback;
	MemoryContext old = CurrentMemoryContext;

	copy_context_push(&errcallback, cstate);
	while (next_copy_row(cstate, estate, slot))
	{
		(void) meter_slot(ts->st, c, slot, rel, MODE_QUEUE);
		billing_flush_if_full(ts->st);
	}
	MemoryContextSwitchTo(old);
	error_context_stack = errcallback.previous;

	flush_statement();

	ExecDropSingleTupleTableSlot(slot);
	FreeExecutorState(estate);
}


/* rows a keep-rows COPY buffers before writing them, and their bytes */
#define KEEP_BUFFER_ROWS	1000
#define KEEP_BUFFER_BYTES	65535

/*
 * store_buffered
 *		Write the n rows buffered in slots to rel in one multi-insert, then
 *		their index entries (with the unique and exclusion checks, as
 *		COPY's own buffer flush does), and empty the buffer.
 */
static void
store_buffered(ResultRelInfo *rri, EState *estate, TupleTableSlot **slots, int n,
			   CommandId cid, BulkInsertState bistate)
{
	Relation	rel = rri->ri_RelationDesc;

	if (n == 0)
		return;
	table_multi_insert(rel, slots, n, cid, 0, bistate);
	for (int i = 0; i < n; i++)
	{
		if (rri->ri_NumIndices > 0)
		{
			List	   *recheck = ExecInsertIndexTuples(rri, slots[i], estate, false,
														false, NULL, NIL);

			/* only a deferrable constraint asks for a recheck: none here */
			Assert(recheck == NIL);
			list_free(recheck);
		}
		ExecClearTuple(slots[i]);
	}
}

/*
 * billing_meter_copy_keep
 *		The rows of a COPY FROM into a metered table that keeps its rows
 *		and whose only INSERT triggers are billing_meter_after_rows (rows
 *		counted from the statement's transition table) and
 *		billing_meter_flush (see ingest_copy.c for the other conditions):
 *		each row parsed is checked (NOT NULL and CHECK constraints), counted
 *		as billing_meter_after_rows counts it and stored with its index
 *		entries, in batches as COPY stores them, and the counts are written
 *		at the end as billing_meter_flush writes them.  The rows are not
 *		formed into a transition table and read back.  Returns the number
 *		of rows stored; errors carry COPY's context (the line).
 */
uint64
billing_meter_copy_keep(Relation rel, Trigger *rows_trigger, CopyFromState cstate)
{
	TriggerState *ts = current_trigger_state();
	TableConf  *c = table_conf(ts, rows_trigger, rel);
	EState	   *estate = CreateExecutorState();
	ResultRelInfo *rri = makeNode(ResultRelInfo);
	TupleTableSlot *row;
	TupleTableSlot *slots[KEEP_BUFFER_ROWS];
	int			nbuffered = 0;
	Size		bytes = 0;
	bool		constrained = RelationGetDescr(rel)->constr != NULL;
	CommandId	cid = GetCurrentCommandId(true);
	BulkInsertState bistate = GetBulkInsertState();
	uint64		processed = 0;
	ErrorContextCallback errcallback;
	MemoryContext old = CurrentMemoryContext;

	/* the relation as COPY's executor state knows it (range table entry 1) */
	ExecInitRangeTable(estate, cstate->range_table);
	ExecInitResultRelation(estate, rri, 1);
	CheckValidResultRel(rri, CMD_INSERT);
	ExecOpenIndices(rri, false);

	row = MakeSingleTupleTableSlot(RelationGetDescr(rel), &TTSOpsVirtual);
	for (int i = 0; i < KEEP_BUFFER_ROWS; i++)
		slots[i] = table_slot_create(rel, NULL);

	copy_context_push(&errcallback, cstate);
	while (next_copy_row(cstate, estate, row))
	{
		if (constrained)
			ExecConstraints(rri, row, estate);
		(void) meter_slot(ts->st, c, row, rel, MODE_COUNT_ONLY);
		billing_flush_if_full(ts->st);
		/* into the buffer: the row's values copied into a tuple of its own */
		MemoryContextSwitchTo(old);
		ExecCopySlot(slots[nbuffered], row);
		bytes += cstate->line_buf.len;
		pgstat_progress_update_param(PROGRESS_COPY_TUPLES_PROCESSED, ++processed);
		if (++nbuffered == KEEP_BUFFER_ROWS || bytes > KEEP_BUFFER_BYTES)
		{
			store_buffered(rri, estate, slots, nbuffered, cid, bistate);
			nbuffered = 0;
			bytes = 0;
		}
	}
	MemoryContextSwitchTo(old);
	store_buffered(rri, estate, slots, nbuffered, cid, bistate);
	error_context_stack = errcallback.previous;

	flush_statement();

	FreeBulkInsertState(bistate);
	table_finish_bulk_insert(rel, 0);
	for (int i = 0; i < KEEP_BUFFER_ROWS; i++)
		ExecDropSingleTupleTableSlot(slots[i]);
	ExecDropSingleTupleTableSlot(row);
	ExecCloseResultRelations(estate);	/* and its indexes */
	ExecCloseRangeTableRelations(estate);
	FreeExecutorState(estate);
	return processed;
}
