/*
 * compact.c
 *		billing.compact_usage(): folds the appended usage deltas into the
 *		packed store billing.usage_days; how is told in compact.h.
 *
 * This file holds the SQL entry points and the batch driver.  An entry
 * point takes the compaction lock (one compaction of the same relations at
 * a time: lock_compaction), loads the meters, makes the memory contexts
 * (the batch's, one row's, the batch's cell array) and chooses the
 * writer: straight into the
 * heap on one node and for a pair of Citus shards on their node, SQL on a
 * Citus coordinator in a transaction block.  The deltas are then taken out batch by batch
 * (compact_deltas.c), each batch folded by billing_compact_fold: sorted and
 * combined (compact_sort.c), merged with the rows usage_days has already
 * (compact_merge.c), written (compact_write.c), and the cells of unique
 * meters handed to billing._unique_fold per account.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

#include "catalog.h"
#include "compact.h"
#include "util.h"

PG_FUNCTION_INFO_V1(billing_compact_usage);
PG_FUNCTION_INFO_V1(billing_compact_pair);

/*
 * load_meters
 *		Every meter and its aggregation, sorted by name bytes.
 */
static void
load_meters(Compaction *cp, MemoryContext cxt)
{
	int			ret;

	ret = SPI_execute("SELECT meter::text, aggregation::text FROM billing.meters "
					  "ORDER BY meter COLLATE \"C\"", true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading billing.meters failed: %s", SPI_result_code_string(ret));
	cp->nmeters = (int) SPI_processed;
	cp->meters = MemoryContextAllocZero(cxt, Max(cp->nmeters, 1) * sizeof(CMeter));
	for (int i = 0; i < cp->nmeters; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *name = SPI_getvalue(tup, desc, 1);
		char	   *agg = SPI_getvalue(tup, desc, 2);

		cp->meters[i].name = MemoryContextStrdup(cxt, name);
		cp->meters[i].len = strlen(name);
		cp->meters[i].agg = billing_aggregation(agg);
		cp->meters[i].is_unique = strcmp(agg, "unique") == 0;
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * fold_unique
 *		Hand the cells of unique meters of one account, cells[0..n), to
 *		billing._unique_fold.
 */
static void
fold_unique(Compaction *cp, Series **by_rank, const BatchCell *cells, int n)
{
	Datum	   *meters = palloc(n * sizeof(Datum));
	Datum	   *dims = palloc(n * sizeof(Datum));
	Datum	   *buckets = palloc(n * sizeof(Datum));
	int			m = 0;
	Datum		args[4];
	Oid			types[4] = {INT8OID, TEXTARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID};
	int			ret;

	for (int i = 0; i < n; i++)
	{
		const Series *ser = by_rank[cells[i].series];

		if (!ser->meter->is_unique)
			continue;
		meters[m] = PointerGetDatum(cstring_to_text_with_len(ser->meter->name, ser->meter->len));
		dims[m] = PointerGetDatum(cstring_to_text_with_len(ser->dim, ser->dimlen));
		buckets[m] = TimestampTzGetDatum(cells[i].c.bucket);
		m++;
	}
	if (m == 0)
		return;
	args[0] = Int64GetDatum(cells[0].account);
	args[1] = billing_compact_array(meters, NULL, m, TEXTOID, -1, false, TYPALIGN_INT);
	args[2] = billing_compact_array(dims, NULL, m, TEXTOID, -1, false, TYPALIGN_INT);
	args[3] = billing_compact_array(buckets, NULL, m, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE);
	ret = SPI_execute_with_args("SELECT billing._unique_fold($1, $2, $3, $4)",
								4, types, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "billing._unique_fold failed: %s", SPI_result_code_string(ret));
	SPI_freetuptable(SPI_tuptable);
}

/*
 * billing_compact_fold
 *		Fold the batch's cells into usage_days (steps 2 to 4 of compact.h).
 */
void
billing_compact_fold(Compaction *cp)
{
	Series	  **by_rank;
	MemoryContext slice_cxt;
	bool		any_unique = false;
	StringInfoData buf;
	MemoryContext old;

	if (cp->ncells == 0)
		return;

	/* series ranked by (meter, dimension); cells sorted and combined */
	by_rank = billing_compact_sort(cp, &any_unique);

	/*
	 * one row per (account, series, day), SLICE_KEYS keys at a time: the
	 * rows those keys have already are read (and held) for the slice only
	 */
	slice_cxt = AllocSetContextCreate(cp->batch_cxt, "billing compaction slice",
									  ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(cp->batch_cxt);
	billing_compact_out_reserve(cp, WRITE_CHUNK);
	initStringInfo(&buf);
	for (int from = 0; from < cp->ncells;)
	{
		int			to = from;
		HTAB	   *old_rows;

		/* the slice: SLICE_KEYS keys, cut between two keys */
		for (int nkeys = 0; to < cp->ncells && nkeys < SLICE_KEYS; nkeys++)
		{
			const BatchCell *first = &cp->cells[to];
			TimestampTz day = STORE_DAY(first->c.bucket);

			to++;
			while (to < cp->ncells && cp->cells[to].account == first->account &&
				   cp->cells[to].series == first->series &&
				   STORE_DAY(cp->cells[to].c.bucket) == day)
				to++;
		}
		old_rows = billing_compact_old_rows(cp, by_rank, from, to, slice_cxt);
		for (int i = from; i < to;)
		{
			const BatchCell *first = &cp->cells[i];
			TimestampTz day = STORE_DAY(first->c.bucket);
			int			j = i + 1;
			RowKey		rk;

			CHECK_FOR_INTERRUPTS();
			while (j < to && cp->cells[j].account == first->account &&
				   cp->cells[j].series == first->series &&
				   STORE_DAY(cp->cells[j].c.bucket) == day)
				j++;
			memset(&rk, 0, sizeof(rk));
			rk.account = first->account;
			rk.day = day;
			rk.series = first->series;
			billing_compact_write_row(cp, by_rank[first->series], first->account, day, first,
									  j - i, hash_search(old_rows, &rk, HASH_FIND, NULL), &buf);
			i = j;
		}
		MemoryContextReset(slice_cxt);
		from = to;
	}
	MemoryContextSwitchTo(old);
	if (cp->heap != NULL)
		billing_compact_heap_flush(cp->heap);
	else
		billing_compact_out_flush(cp);

	/* unique meters: per account */
	if (any_unique)
	{
		for (int i = 0; i < cp->ncells;)
		{
			int			j = i + 1;

			while (j < cp->ncells && cp->cells[j].account == cp->cells[i].account)
				j++;
			old = MemoryContextSwitchTo(cp->batch_cxt);
			fold_unique(cp, by_rank, &cp->cells[i], j - i);
			MemoryContextSwitchTo(old);
			i = j;
		}
	}
}

/*
 * compact_relations
 *		Compact the deltas of deltas (usage_deltas, or a shard of it) into
 *		days (usage_days, or the co-located shard): straight through their
 *		heaps when heap, else through SQL that Citus routes (both InvalidOid).
 *		Connected to SPI, the lock taken; returns the delta cells folded.
 */
static int64
compact_relations(Oid deltas, Oid days, bool heap, MemoryContext cxt)
{
	Compaction	cp;

	/* the heaps are written straight, past the executor's read-only check */
	if (heap)
		PreventCommandIfReadOnly("compact_usage()");
	memset(&cp, 0, sizeof(cp));
	cp.deltas_rel = deltas;
	cp.days_rel = days;
	if (OidIsValid(days))
		cp.days_name = quote_qualified_identifier(get_namespace_name(get_rel_namespace(days)),
												  get_rel_name(days));
	else
		cp.days_name = "billing.usage_days";
	load_meters(&cp, cxt);
	cp.batch_cxt = AllocSetContextCreate(cxt, "billing compaction batch",
										 ALLOCSET_DEFAULT_SIZES);
	cp.row_cxt = AllocSetContextCreate(cxt, "billing compaction row",
									   ALLOCSET_DEFAULT_SIZES);
	cp.cells_cxt = AllocSetContextCreate(cxt, "billing compaction cells",
										 ALLOCSET_DEFAULT_SIZES);
	cp.limit = (Size) maintenance_work_mem * 1024;
	billing_compact_begin(&cp);
	if (heap)
		cp.heap = billing_compact_heap_begin(days);

	if (cp.heap != NULL)
		billing_compact_take_heap(&cp);
	else
		billing_compact_take_sql(&cp);
	billing_compact_fold(&cp);
	if (cp.heap != NULL)
		billing_compact_heap_end(cp.heap);
	MemoryContextDelete(cp.batch_cxt);
	MemoryContextDelete(cp.row_cxt);
	MemoryContextDelete(cp.cells_cxt);
	return cp.folded;
}

/*
 * lock_compaction
 *		The lock that keeps two compactions of the same relations apart:
 *		SHARE ROW EXCLUSIVE on the usage_days relation they write (the table
 *		on one node or a Citus coordinator, a shard on the node that has
 *		it), held to the end of the transaction.  Nothing else writes it,
 *		readers and ingest (which appends to usage_deltas) take modes it
 *		does not conflict with, and a role must be able to write the table
 *		to take a mode that conflicts with it, so a session outside billing
 *		cannot hold compaction off (an advisory lock, which any role may
 *		take, could).
 */
static void
lock_compaction(Oid days)
{
	LockRelationOid(days, ShareRowExclusiveLock);
}

/*
 * sql_int8
 *		The bigint the one-row query sql returns (0 for NULL).
 */
static int64
sql_int8(const char *sql)
{
	bool		isnull;
	Datum		d;

	if (SPI_execute(sql, false, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "%s failed", sql);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetInt64(d);
}

/*
 * billing_compact_usage
 *		billing.compact_usage(): see compact.h.  On one node, the tables
 *		themselves through their heaps.  On Citus, every pair of co-located
 *		shards on the node that holds it (billing._compact_citus: from the
 *		coordinator all of them, in parallel; from a worker node its own),
 *		except on a coordinator in a transaction block, or in a transaction
 *		that wrote already: the nodes' own connections would not see what
 *		it wrote and could wait for its locks, so the tables are compacted
 *		there through SQL that Citus routes to the shards, in the caller's
 *		transaction.
 */
Datum
billing_compact_usage(PG_FUNCTION_ARGS)
{
	MemoryContext cxt = CurrentMemoryContext;
	int64		folded;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (!billing_distributed())
	{
		/* one compaction at a time; concurrent ingest goes on (it only appends) */
		lock_compaction(billing_relid("usage_days"));
		folded = compact_relations(billing_relid("usage_deltas"), billing_relid("usage_days"),
								   true, cxt);
	}
	else if ((IsTransactionBlock() || TransactionIdIsValid(GetTopTransactionIdIfAny())) &&
			 sql_int8("SELECT CASE WHEN pg_catalog.citus_is_coordinator() THEN 1::int8 ELSE 0::int8 END") == 1)
	{
		lock_compaction(billing_relid("usage_days"));
		folded = compact_relations(InvalidOid, InvalidOid, false, cxt);
	}
	else
		folded = sql_int8("SELECT billing._compact_citus()");
	SPI_finish();
	PG_RETURN_INT64(folded);
}

/*
 * billing_compact_pair
 *		billing._compact_pair(deltas regclass, days regclass): compact one
 *		shard of usage_deltas into the co-located shard of usage_days, on the
 *		node that holds them, through their heaps as on one node.  Called by
 *		billing._compact_shard (34_compaction.sql), which checked the pair in
 *		Citus's metadata and locked it against a move.  It writes the heaps
 *		straight, so it checks the caller's rights on them first (the
 *		extension owner's, in compact_usage()).
 */
Datum
billing_compact_pair(PG_FUNCTION_ARGS)
{
	Oid			deltas = PG_GETARG_OID(0);
	Oid			days = PG_GETARG_OID(1);
	Oid			ns = get_namespace_oid("billing", false);
	MemoryContext cxt = CurrentMemoryContext;
	const char *dn = get_rel_name(deltas);
	const char *un = get_rel_name(days);
	int64		folded;

	/* the internal helpers are the readers' (99_roles.sql): table rights apply */
	if (dn != NULL && un != NULL &&
		(pg_class_aclmask(deltas, GetUserId(), ACL_SELECT | ACL_DELETE, ACLMASK_ALL) !=
		 (ACL_SELECT | ACL_DELETE) ||
		 pg_class_aclmask(days, GetUserId(), ACL_SELECT | ACL_INSERT | ACL_UPDATE, ACLMASK_ALL) !=
		 (ACL_SELECT | ACL_INSERT | ACL_UPDATE)))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to compact %s into %s", dn, un)));
	if (dn == NULL || un == NULL || get_rel_namespace(deltas) != ns ||
		get_rel_namespace(days) != ns || strncmp(dn, "usage_deltas_", 13) != 0 ||
		strncmp(un, "usage_days_", 11) != 0 || get_rel_relkind(deltas) != RELKIND_RELATION ||
		get_rel_relkind(days) != RELKIND_RELATION)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("billing._compact_pair compacts a shard of billing.usage_deltas into one of billing.usage_days")));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	lock_compaction(days);
	folded = compact_relations(deltas, days, true, cxt);
	SPI_finish();
	PG_RETURN_INT64(folded);
}
