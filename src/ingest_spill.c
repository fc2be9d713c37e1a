/*
 * ingest_spill.c
 *		Delta rows of a statement's earlier flushes, kept on tape until the
 *		statement ends, and the merge that writes them.
 *
 * A COPY flushing dozens of times would otherwise write a row per account
 * each time, and the rows, not their bytes, cost most.  Each flush puts its
 * delta rows, sorted by account, on a logical tape as one run (a RunSet
 * holds up to MAX_RUNS); the merge reads the runs side by side and writes,
 * for each account in order, its rows of every run joined into as few rows
 * as CELLS_ROW_BYTES allows, through any DeltaWriter.
 *
 * On tape a delta row is the account, the seq (0 when it has none), whether
 * it has a seq (a last meter), the length of the packed cells and the cells
 * (without the varlena header).
 */
#include "postgres.h"

#include "utils/logtape.h"
#include "utils/memutils.h"

#include "cells.h"
#include "ingest.h"

/* a delta row read back from tape */
typedef struct RunRow
{
	int64		account;
	int64		seq;
	bool		has_seq;
	uint32		len;
	char	   *data;			/* the packed cells, in the run's buffer */
	Size		cap;			/* size of that buffer */
	bool		valid;			/* false at the end of the run */
} RunRow;

/*
 * billing_runs_put
 *		Put the packed delta rows of one flush on tape as a run (the set
 *		must have room for it).
 */
void
billing_runs_put(RunSet *rs, const DeltaRows *rows)
{
	LogicalTape *lt;
	/* the tape set and its buffers live as long as the accumulator */
	MemoryContext old = MemoryContextSwitchTo(rs->cxt);

	Assert(rs->nruns < MAX_RUNS);
	if (rs->tapes == NULL)
		rs->tapes = LogicalTapeSetCreate(false, NULL, -1);
	lt = LogicalTapeCreate(rs->tapes);
	for (long r = 0; r < rows->nrows; r++)
	{
		bytea	   *v = (bytea *) DatumGetPointer(rows->cells[r]);
		uint32		len = VARSIZE(v) - VARHDRSZ;
		int64		seq = rows->noseq[r] ? 0 : DatumGetInt64(rows->seqs[r]);
		char		has_seq = !rows->noseq[r];

		LogicalTapeWrite(lt, &rows->accounts[r], sizeof(int64));
		LogicalTapeWrite(lt, &seq, sizeof(int64));
		LogicalTapeWrite(lt, &has_seq, 1);
		LogicalTapeWrite(lt, &len, sizeof(uint32));
		LogicalTapeWrite(lt, VARDATA(v), len);
	}
	rs->runs[rs->nruns++] = lt;
	MemoryContextSwitchTo(old);
}

/*
 * read_run_row
 *		The next row of a run, or valid = false at its end; its data buffer
 *		grows in cxt.
 */
static void
read_run_row(LogicalTape *lt, RunRow *row, MemoryContext cxt)
{
	char		has_seq;

	if (LogicalTapeRead(lt, &row->account, sizeof(int64)) != sizeof(int64))
	{
		row->valid = false;
		return;
	}
	if (LogicalTapeRead(lt, &row->seq, sizeof(int64)) != sizeof(int64) ||
		LogicalTapeRead(lt, &has_seq, 1) != 1 ||
		LogicalTapeRead(lt, &row->len, sizeof(uint32)) != sizeof(uint32))
		elog(ERROR, "could not read usage deltas back from tape");
	row->has_seq = has_seq != 0;
	if (row->len > row->cap)
	{
		row->cap = Max(row->len, 2 * row->cap);
		row->data = row->data ? repalloc(row->data, row->cap)
			: MemoryContextAlloc(cxt, row->cap);
	}
	if (LogicalTapeRead(lt, row->data, row->len) != row->len)
		elog(ERROR, "could not read usage deltas back from tape");
	row->valid = true;
}

/*
 * merge_emit
 *		Queue one merged delta row: a copy of the packed cells data[0..len)
 *		(version byte and series) in rowcxt, which is emptied once the
 *		writer has written what it was given.
 */
static void
merge_emit(DeltaWriter *w, MemoryContext rowcxt, int64 account, bool has_seq,
		   int64 seq, const char *data, uint32 len)
{
	bytea	   *v = MemoryContextAlloc(rowcxt, VARHDRSZ + len);

	SET_VARSIZE(v, VARHDRSZ + len);
	memcpy(VARDATA(v), data, len);
	if (w->add(w, account, has_seq, seq, PointerGetDatum(v)))
		MemoryContextReset(rowcxt);
}

/*
 * billing_runs_merge
 *		Write the runs on tape as delta rows into w: for each account, in
 *		order, its rows of every run joined into as few rows as
 *		CELLS_ROW_BYTES allows (a packed value is a list of series, so
 *		joining is appending).  A row with a seq (a last meter) keeps its
 *		own row and seq: the seq orders values that arrived at the same
 *		timestamp.  Closes w; the set is empty afterwards.
 */
void
billing_runs_merge(RunSet *rs, DeltaWriter *w)
{
	MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext, "billing merge",
											  ALLOCSET_DEFAULT_SIZES);
	MemoryContext rowcxt = AllocSetContextCreate(cxt, "billing merged rows",
												 ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	RunRow	   *cur = palloc0(rs->nruns * sizeof(RunRow));
	StringInfoData buf;
	int			r;

	for (r = 0; r < rs->nruns; r++)
	{
		LogicalTapeRewindForRead(rs->runs[r], BLCKSZ);
		read_run_row(rs->runs[r], &cur[r], cxt);
	}
	initStringInfo(&buf);
	for (;;)
	{
		int64		account = PG_INT64_MAX;
		bool		any = false;

		for (r = 0; r < rs->nruns; r++)
			if (cur[r].valid && (!any || cur[r].account < account))
			{
				account = cur[r].account;
				any = true;
			}
		if (!any)
			break;

		/* the rows of this account, run by run */
		resetStringInfo(&buf);
		for (r = 0; r < rs->nruns; r++)
		{
			while (cur[r].valid && cur[r].account == account)
			{
				RunRow	   *row = &cur[r];

				if (row->has_seq)	/* a row of its own */
					merge_emit(w, rowcxt, account, true, row->seq, row->data, row->len);
				else
				{
					/* append its series (all but the version byte) */
					if (buf.len > 0 && buf.len + row->len - 1 > CELLS_ROW_BYTES)
					{
						merge_emit(w, rowcxt, account, false, 0, buf.data, buf.len);
						resetStringInfo(&buf);
					}
					if (buf.len == 0)
						appendBinaryStringInfo(&buf, row->data, 1);
					appendBinaryStringInfo(&buf, row->data + 1, row->len - 1);
				}
				read_run_row(rs->runs[r], row, cxt);
			}
		}
		if (buf.len > 0)
			merge_emit(w, rowcxt, account, false, 0, buf.data, buf.len);
	}
	w->close(w);
	/* the read buffers are in cxt */
	for (r = 0; r < rs->nruns; r++)
		LogicalTapeClose(rs->runs[r]);
	LogicalTapeSetClose(rs->tapes);
	rs->tapes = NULL;
	rs->nruns = 0;
	MemoryContextSwitchTo(old);
	MemoryContextDelete(cxt);
}
