/*
 * audit_chain.c
 *		The one definition of appending a row to an audit chain, which
 *		every writer of the log uses, and the chain heads a transaction
 *		holds.
 *
 * Appending.  A chain's head (last seq and hash) is its row in
 * billing.audit_heads.  The first append of a transaction to a chain locks
 * that row (SELECT ... FOR UPDATE) until the transaction ends: appends to
 * one chain take turns, writers of different chains never wait for each
 * other.  On one node the head is then kept in backend memory for the
 * rest of the transaction: each row is hashed after the one before it and
 * kept in a buffer; at the end of the statement
 * (billing_audit_chain_flush: the statement trigger of an audited table,
 * the end of a call from SQL, and before commit; earlier when the buffer
 * outgrows work_mem) the buffered rows are written straight into
 * billing.audit_log (heap multi-insert and primary key, sorted by chain
 * and seq) and each moved head row once, not once per row.  A
 * subtransaction that aborts takes its rows and head
 * writes with it; the heads in memory go back to where they were when it
 * started.  On Citus (billing.audit_log distributed), or when
 * billing.audit_log has gained triggers, rules or indexes of its own, every
 * append goes through SQL instead: lock and read the head, insert the row,
 * write the head, as Citus routes each statement to the chain's shard.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/cryptohash.h"
#include "common/hashfn.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/execnodes.h"
#include "pgtime.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#ifdef USE_OPENSSL
#include <openssl/evp.h>
#endif

#include "audit_int.h"
#include "billing.h"
#include "catalog.h"
#include "util.h"

/* the statement writing the moved heads, prepared once per backend */
static SPIPlanPtr flush_plan = NULL;

/*
 * A chain head's state, as saved when a subtransaction first changed it:
 * what to go back to if that subtransaction aborts.
 */
typedef struct HeadSave
{
	SubTransactionId subid;		/* the subtransaction that changed it */
	SubTransactionId prev_mod;	/* mod_subid before that */
	int64		seq;
	int64		written_seq;
	TimestampTz at;
	bool		has_hash;
	uint8		hash[PG_SHA256_DIGEST_LENGTH];
	struct HeadSave *next;
} HeadSave;

/*
 * A chain this transaction has locked.  seq and hash are its last row
 * (appended: in billing.audit_log, or still in the row buffer);
 * written_seq is the seq its row in billing.audit_heads holds.  The head
 * is dirty while they differ.
 */
typedef struct ChainHead
{
	int64		chain;			/* hash key */
	SubTransactionId lock_subid;	/* the subtransaction holding the row lock */
	SubTransactionId mod_subid; /* the last subtransaction that changed this */
	int64		seq;
	int64		written_seq;
	TimestampTz at;				/* time of its last row this transaction */
	bool		has_hash;
	bool		listed;			/* in dirty_chains */
	uint8		hash[PG_SHA256_DIGEST_LENGTH];
	HeadSave   *saves;			/* newest first */
} ChainHead;

static MemoryContext heads_cxt = NULL;	/* child of TopTransactionContext */
static HTAB *heads = NULL;
static int64 *dirty_chains = NULL;
static int	ndirty = 0;
static int	maxdirty = 0;
static SubTransactionId max_subid = InvalidSubTransactionId;	/* highest changing */

static MemoryContext rows_cxt = NULL;	/* child of heads_cxt: the details */
static LogRow *rows = NULL;
static int	nrows = 0;
static int	maxrows = 0;
static Size rows_bytes = 0;		/* details buffered, for the memory bound */
static const Interned *last_actor = NULL;	/* the strings of the last row */
static const Interned *last_action = NULL;
static const Interned *last_object = NULL;

/* chain heads a transaction keeps in memory before forgetting clean ones */
#define MAX_HEADS		65536

/* the actor of this transaction's rows, by outer user id */
static Oid	actor_user = InvalidOid;
static char *actor_name = NULL;

/*
 * heads_create
 *		The transaction's table of chain heads, created on first use.
 */
static void
heads_create(void)
{
	HASHCTL		ctl;

	if (heads != NULL)
		return;
	heads_cxt = AllocSetContextCreate(TopTransactionContext, "billing audit chain heads",
									  ALLOCSET_DEFAULT_SIZES);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(int64);
	ctl.entrysize = sizeof(ChainHead);
	ctl.hcxt = heads_cxt;
	heads = hash_create("billing audit chain heads", 64, &ctl,
						HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	ndirty = maxdirty = 0;
	dirty_chains = NULL;
	max_subid = InvalidSubTransactionId;
	rows_cxt = AllocSetContextCreate(heads_cxt, "billing audit rows",
									 ALLOCSET_DEFAULT_SIZES);
	rows = NULL;
	nrows = maxrows = 0;
	rows_bytes = 0;
	last_actor = last_action = last_object = NULL;
}

/*
 * intern
 *		A copy of s (and its text datum) that lives as long as the
 *		transaction, for the buffered rows.  Consecutive rows mostly share
 *		their actor, action and object (a statement's rows): *last, the
 *		field's previous string, is reused when it is the same.
 */
static const Interned *
intern(const char *s, const Interned **last)
{
	MemoryContext old;
	Interned   *in;

	if (*last != NULL && strcmp((*last)->str, s) == 0)
		return *last;
	old = MemoryContextSwitchTo(rows_cxt);
	in = palloc(sizeof(Interned));
	in->str = pstrdup(s);
	in->txt = cstring_to_text(s);
	MemoryContextSwitchTo(old);
	*last = in;
	return in;
}

/*
 * rows_forget
 *		Drop the buffered rows from index first on (written, or appended by
 *		a subtransaction that aborted).  Their memory goes back to rows_cxt,
 *		kept for the next rows of the transaction (not to the system, from
 *		which it would come back as fresh pages).
 */
static void
rows_forget(int first)
{
	for (int i = first; i < nrows; i++)
	{
		rows_bytes -= VARSIZE(rows[i].details);
		pfree(rows[i].details);
	}
	nrows = first;
}

/* put a dirty chain on the list billing_audit_chain_flush writes */
static void
list_dirty(ChainHead *e)
{
	if (e->listed)
		return;
	if (ndirty == maxdirty)
	{
		maxdirty = maxdirty ? maxdirty * 2 : 64;
		dirty_chains = dirty_chains
			? repalloc(dirty_chains, maxdirty * sizeof(int64))
			: MemoryContextAlloc(heads_cxt, maxdirty * sizeof(int64));
	}
	dirty_chains[ndirty++] = e->chain;
	e->listed = true;
}

/*
 * head_touch
 *		Before the current subtransaction changes a head: the first time it
 *		does, save the state to go back to should it abort.
 */
static void
head_touch(ChainHead *e)
{
	SubTransactionId cur = GetCurrentSubTransactionId();
	HeadSave   *s;

	if (e->mod_subid == cur)
		return;
	s = MemoryContextAlloc(heads_cxt, sizeof(HeadSave));
	s->subid = cur;
	s->prev_mod = e->mod_subid;
	s->seq = e->seq;
	s->written_seq = e->written_seq;
	s->at = e->at;
	s->has_hash = e->has_hash;
	memcpy(s->hash, e->hash, sizeof(s->hash));
	s->next = e->saves;
	e->saves = s;
	e->mod_subid = cur;
	if (cur > max_subid)
		max_subid = cur;
}

/*
 * billing_audit_head_get
 *		The head of a chain, locked by this transaction (locked and read on
 *		first use).
 */
ChainHead *
billing_audit_head_get(int64 chain)
{
	ChainHead  *e;
	bool		found;
	int64		seq;
	bool		has_hash;
	uint8		hash[PG_SHA256_DIGEST_LENGTH];

	heads_create();
	e = hash_search(heads, &chain, HASH_FIND, NULL);
	if (e != NULL)
		return e;
	billing_audit_read_head(chain, &seq, &has_hash, hash);
	e = hash_search(heads, &chain, HASH_ENTER, &found);
	Assert(!found);
	e->lock_subid = e->mod_subid = GetCurrentSubTransactionId();
	if (e->mod_subid > max_subid)
		max_subid = e->mod_subid;
	e->seq = e->written_seq = seq;
	e->at = 0;
	e->has_hash = has_hash;
	memcpy(e->hash, hash, sizeof(e->hash));
	e->listed = false;
	e->saves = NULL;
	return e;
}

/*
 * heads_subxact_cb
 *		At the end of a subtransaction: on commit its parent takes over its
 *		changes; on abort the heads go back to where they were before it
 *		changed them (its rows and head writes are gone), and the heads it
 *		locked are forgotten (the locks are gone too).
 */
static void
heads_subxact_cb(SubXactEvent event, SubTransactionId mySubid,
				 SubTransactionId parentSubid, void *arg)
{
	HASH_SEQ_STATUS it;
	ChainHead  *e;

	if (heads == NULL ||
		(event != SUBXACT_EVENT_COMMIT_SUB && event != SUBXACT_EVENT_ABORT_SUB))
		return;

	/* its rows not yet written: the tail of the buffer */
	if (event == SUBXACT_EVENT_COMMIT_SUB)
	{
		for (int i = nrows - 1; i >= 0 && rows[i].subid == mySubid; i--)
			rows[i].subid = parentSubid;
	}
	else
	{
		int			first = nrows;

		while (first > 0 && rows[first - 1].subid == mySubid)
			first--;
		if (first < nrows)
			rows_forget(first);
	}

	if (mySubid > max_subid)
		return;

	hash_seq_init(&it, heads);
	while ((e = hash_seq_search(&it)) != NULL)
	{
		if (event == SUBXACT_EVENT_COMMIT_SUB)
		{
			if (e->lock_subid == mySubid)
				e->lock_subid = parentSubid;
			if (e->mod_subid == mySubid)
			{
				HeadSave   *s = e->saves;

				if (s != NULL && s->subid == mySubid)
				{
					if (s->prev_mod == parentSubid)
					{
						/* the parent's own save (or lock) comes first */
						e->saves = s->next;
						pfree(s);
					}
					else
						s->subid = parentSubid;
				}
				e->mod_subid = parentSubid;
			}
		}
		else if (e->lock_subid == mySubid)
		{
			/* locked in the aborted subtransaction: nothing of it is left */
			e->listed = false;
			hash_search(heads, &e->chain, HASH_REMOVE, NULL);
		}
		else if (e->mod_subid == mySubid)
		{
			HeadSave   *s = e->saves;

			Assert(s != NULL && s->subid == mySubid);
			e->seq = s->seq;
			e->written_seq = s->written_seq;
			e->at = s->at;
			e->has_hash = s->has_hash;
			memcpy(e->hash, s->hash, sizeof(e->hash));
			e->mod_subid = s->prev_mod;
			e->saves = s->next;
			pfree(s);
			if (e->seq != e->written_seq)
				list_dirty(e);
		}
	}
}

/*
 * heads_xact_cb
 *		Before commit (or PREPARE TRANSACTION): write the heads still
 *		dirty, which only happens when rows were appended where no
 *		statement trigger flushes them.  At the end: forget everything
 *		(the memory goes with TopTransactionContext).
 */
static void
heads_xact_cb(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			if (heads != NULL && (nrows > 0 || ndirty > 0))
			{
				/* no statement runs any more: flush under a snapshot of our own */
				PushActiveSnapshot(GetTransactionSnapshot());
				billing_audit_chain_flush();
				PopActiveSnapshot();
			}
			break;
		case XACT_EVENT_PARALLEL_PRE_COMMIT:
			break;
		default:
			heads = NULL;
			heads_cxt = NULL;
			dirty_chains = NULL;
			ndirty = maxdirty = 0;
			max_subid = InvalidSubTransactionId;
			rows_cxt = NULL;
			rows = NULL;
			nrows = maxrows = 0;
			rows_bytes = 0;
			last_actor = last_action = last_object = NULL;
			actor_user = InvalidOid;
			actor_name = NULL;
			break;
	}
}

/*
 * billing_audit_init
 *		Register the transaction callbacks (from _PG_init).
 */
void
billing_audit_init(void)
{
	RegisterXactCallback(heads_xact_cb, NULL);
	RegisterSubXactCallback(heads_subxact_cb, NULL);
}

/*
 * row_cmp
 *		Order of writing buffered rows: chain, then seq.
 */
static int
row_cmp(const void *a, const void *b)
{
	const LogRow *x = *(LogRow *const *) a;
	const LogRow *y = *(LogRow *const *) b;

	if (x->chain != y->chain)
		return x->chain < y->chain ? -1 : 1;
	if (x->seq != y->seq)
		return x->seq < y->seq ? -1 : 1;
	return 0;
}

/*
 * chain_cmp
 *		qsort/bsearch order of chain ids.
 */
static int
chain_cmp(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * pending_chains
 *		The chains with rows in rows[0 .. upto), sorted and unique (*n of
 *		them); NULL when there are none.
 */
static int64 *
pending_chains(int upto, int *n)
{
	int64	   *c;
	int			k = 0;

	*n = 0;
	if (upto == 0)
		return NULL;
	c = palloc(upto * sizeof(int64));
	for (int i = 0; i < upto; i++)
		c[i] = rows[i].chain;
	qsort(c, upto, sizeof(int64), chain_cmp);
	for (int i = 0; i < upto; i++)
		if (k == 0 || c[k - 1] != c[i])
			c[k++] = c[i];
	*n = k;
	return c;
}

/*
 * flush_rows
 *		Write into billing.audit_log the buffered rows of the current
 *		subtransaction: the tail of the buffer.  Rows of enclosing ones
 *		wait for their own statement's end, or the commit (written here,
 *		they would go if this subtransaction aborted); so do this one's
 *		rows of a chain that has rows of an enclosing one waiting, which
 *		come first in the chain: the log never shows a chain with a gap.
 */
static void
flush_rows(void)
{
	SubTransactionId cur = GetCurrentSubTransactionId();
	int			first = nrows;
	int			nout = 0;
	int			nkept = 0;
	int			nwait;
	int64	   *waiting;
	LogRow	  **sorted;
	OwnerScope	scope;

	while (first > 0 && rows[first - 1].subid == cur)
		first--;
	if (first == nrows)
		return;
	waiting = pending_chains(first, &nwait);
	sorted = palloc((nrows - first) * sizeof(LogRow *));
	for (int i = first; i < nrows; i++)
		if (waiting == NULL ||
			bsearch(&rows[i].chain, waiting, nwait, sizeof(int64), chain_cmp) == NULL)
			sorted[nout++] = &rows[i];
	if (nout > 0)
	{
		qsort(sorted, nout, sizeof(LogRow *), row_cmp);
		billing_audit_rels_load();
		billing_audit_owner_enter(&scope, false);
		billing_audit_write_rows(sorted, nout);
		billing_audit_owner_leave(&scope);
	}
	pfree(sorted);
	if (waiting == NULL)
	{
		rows_forget(first);
		return;
	}
	/* keep the rows not written, in order, at the tail */
	for (int i = first; i < nrows; i++)
	{
		if (bsearch(&rows[i].chain, waiting, nwait, sizeof(int64), chain_cmp) != NULL)
			rows[first + nkept++] = rows[i];
		else
		{
			rows_bytes -= VARSIZE(rows[i].details);
			pfree(rows[i].details);
		}
	}
	nrows = first + nkept;
	pfree(waiting);
}

/*
 * heads_trim
 *		Keep the memory of a transaction that appends to very many chains
 *		bounded: past MAX_HEADS heads, forget those that are clean and that
 *		no open subtransaction changed.  The transaction still holds their
 *		locks; an append to one of them reads its head row again, which is
 *		up to date.
 */
static void
heads_trim(void)
{
	HASH_SEQ_STATUS it;
	ChainHead  *e;

	if (hash_get_num_entries(heads) <= MAX_HEADS)
		return;
	hash_seq_init(&it, heads);
	while ((e = hash_seq_search(&it)) != NULL)
		if (e->seq == e->written_seq && e->saves == NULL && !e->listed &&
			e->lock_subid == TopSubTransactionId && e->mod_subid == TopSubTransactionId)
			hash_search(heads, &e->chain, HASH_REMOVE, NULL);
}

/*
 * billing_audit_chain_flush
 *		Write the buffered rows of the current subtransaction (flush_rows),
 *		then every dirty chain head of this transaction into
 *		billing.audit_heads, in one statement.  The list of dirty heads is
 *		emptied only once that statement succeeded.
 */
void
billing_audit_chain_flush(void)
{
	Datum	   *chains;
	Datum	   *seqs;
	Datum	   *hashes;
	int			n = 0;
	Datum		values[3];
	Oid			types[3] = {INT8ARRAYOID, INT8ARRAYOID, BYTEAARRAYOID};
	OwnerScope	scope;
	int			ret;
	int64	   *buffered;
	int			nbuffered;

	if (heads == NULL)
		return;
	flush_rows();
	if (ndirty == 0)
		return;
	/* a head moves with the rows written: not past a row still waiting */
	buffered = pending_chains(nrows, &nbuffered);
	chains = palloc(ndirty * sizeof(Datum));
	seqs = palloc(ndirty * sizeof(Datum));
	hashes = palloc(ndirty * sizeof(Datum));
	for (int i = 0; i < ndirty; i++)
	{
		ChainHead  *e = hash_search(heads, &dirty_chains[i], HASH_FIND, NULL);

		if (e == NULL || !e->listed || e->seq == e->written_seq)
			continue;
		if (buffered != NULL &&
			bsearch(&e->chain, buffered, nbuffered, sizeof(int64), chain_cmp) != NULL)
			continue;
		Assert(e->has_hash);
		chains[n] = Int64GetDatum(e->chain);
		seqs[n] = Int64GetDatum(e->seq);
		hashes[n] = PointerGetDatum(billing_audit_bytea((const char *) e->hash, sizeof(e->hash)));
		e->listed = false;		/* once: a chain may be on the list twice */
		n++;
	}
	for (int i = 0; i < n; i++)
	{
		int64		chain = DatumGetInt64(chains[i]);

		((ChainHead *) hash_search(heads, &chain, HASH_FIND, NULL))->listed = true;
	}

	if (n > 0)
	{
		billing_audit_rels_load();
		billing_audit_owner_enter(&scope, true);
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		/*
		 * one generic plan: with custom plans (the planner's choice, the
		 * arrays' lengths known) every flush planned the statement again,
		 * and a finalize of many invoices flushes once per invoice
		 */
		(void) billing_spi_plan(&flush_plan,
								"UPDATE billing.audit_heads h SET seq = u.seq, hash = u.hash "
								"FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), "
								"pg_catalog.unnest($3)) AS u(account_id, seq, hash) "
								"WHERE h.account_id OPERATOR(pg_catalog.=) u.account_id",
								3, types, CURSOR_OPT_GENERIC_PLAN);
		values[0] = PointerGetDatum(construct_array(chains, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
		values[1] = PointerGetDatum(construct_array(seqs, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
		values[2] = PointerGetDatum(construct_array(hashes, n, BYTEAOID, -1, false, TYPALIGN_INT));
		ret = SPI_execute_plan(flush_plan, values, NULL, false, 0);
		if (ret != SPI_OK_UPDATE || SPI_processed != (uint64) n)
			elog(ERROR, "could not write %d audit chain heads: %s", n, SPI_result_code_string(ret));
		SPI_finish();
		billing_audit_owner_leave(&scope);
	}

	/* written: the heads are clean, in this subtransaction; those waiting
	 * for their rows stay on the list */
	{
		int			kept = 0;

		for (int i = 0; i < ndirty; i++)
		{
			ChainHead  *e = hash_search(heads, &dirty_chains[i], HASH_FIND, NULL);

			if (e == NULL || !e->listed)
				continue;
			if (e->seq != e->written_seq && buffered != NULL &&
				bsearch(&e->chain, buffered, nbuffered, sizeof(int64), chain_cmp) != NULL)
			{
				dirty_chains[kept++] = e->chain;
				continue;
			}
			e->listed = false;
			if (e->seq != e->written_seq)
			{
				head_touch(e);
				e->written_seq = e->seq;
			}
		}
		ndirty = kept;
	}
	if (buffered != NULL)
		pfree(buffered);
	heads_trim();
}

/* ---------------------------------------------------------------------
 * Appending
 * ---------------------------------------------------------------------
 */

/*
 * current_actor
 *		The name of the role the client acts as (see billing_audit_actor),
 *		looked up once per transaction and role.
 */
static const char *
current_actor(void)
{
	Oid			user = GetOuterUserId();

	if (actor_name == NULL || actor_user != user)
	{
		actor_name = MemoryContextStrdup(TopTransactionContext,
										 GetUserNameFromId(user, false));
		actor_user = user;
	}
	return actor_name;
}

/*
 * billing_audit_append_at
 *		billing_audit_chain_append with a given time stamp (0: the clock),
 *		never earlier than the chain's last row of this transaction.
 */
int64
billing_audit_append_at(int64 chain, const char *action, const char *object,
						Jsonb *details, const char *details_text, TimestampTz at)
{
	const char *actor = current_actor();
	char	   *json = NULL;
	ChainHead  *e;
	StringInfoData buf;
	LogRow	   *r;
	int64		seq;

	if (chain < 0)
		ereport(ERROR,
				(errcode(ERRCODE_CHECK_VIOLATION),
				 errmsg("audit chain " INT64_FORMAT " is negative", chain),
				 errdetail("Audit chains are account ids, 0 and up.")));
	PreventCommandIfReadOnly("an audit log append");
	PreventCommandIfParallelMode("an audit log append");
	if (details_text == NULL)
		details_text = json = JsonbToCString(NULL, &details->root, VARSIZE(details));
	billing_audit_rels_load();

	/*
	 * Through SQL where audit_log is not as the extension made it (Citus,
	 * its own triggers or indexes), unless this transaction already keeps
	 * heads in memory: then it goes on buffering (its heads are ahead of
	 * the table's), and the write of the buffered rows goes through SQL
	 * (billing_audit_write_rows).
	 */
	if (!billing_audit_rels.direct && heads == NULL)
	{
		if (at == 0)
			at = GetCurrentTimestamp();
		seq = billing_audit_append_sql(chain, at, actor, action, object, details, details_text);
		if (json)
			pfree(json);
		return seq;
	}

	e = billing_audit_head_get(chain);
	/* taken under the lock: at never goes back within a chain */
	if (at == 0)
		at = GetCurrentTimestamp();
	if (at < e->at)
		at = e->at;
	seq = e->seq + 1;

	if (nrows == maxrows)
	{
		maxrows = maxrows ? maxrows * 2 : 256;
		rows = rows ? repalloc(rows, maxrows * sizeof(LogRow))
			: MemoryContextAlloc(rows_cxt, maxrows * sizeof(LogRow));
	}
	r = &rows[nrows];
	r->chain = chain;
	r->seq = seq;
	r->at = at;
	r->subid = GetCurrentSubTransactionId();
	r->actor = intern(actor, &last_actor);
	r->action = intern(action, &last_action);
	r->object = intern(object, &last_object);
	r->has_prev = e->has_hash;
	memcpy(r->prev, e->hash, sizeof(r->prev));

	initStringInfo(&buf);
	if (e->has_hash)
		appendBinaryStringInfo(&buf, (const char *) e->hash, sizeof(e->hash));
	billing_audit_encode_fields(&buf, chain, seq, at, actor, strlen(actor), action, strlen(action),
								object, strlen(object), details_text);
	billing_audit_sha256(buf.data, buf.len, r->hash);
	pfree(buf.data);
	if (json)
		pfree(json);
	r->details = MemoryContextAlloc(rows_cxt, VARSIZE(details));
	memcpy(r->details, details, VARSIZE(details));
	rows_bytes += VARSIZE(details);
	nrows++;

	/* the head changes in this subtransaction: save it first */
	head_touch(e);
	e->seq = seq;
	e->has_hash = true;
	memcpy(e->hash, r->hash, sizeof(e->hash));
	e->at = at;
	list_dirty(e);

	/* a statement appending more than work_mem writes the rows it has */
	if (rows_bytes + (Size) nrows * sizeof(LogRow) >
		Min((Size) work_mem * 1024, MaxAllocSize / 2))
		flush_rows();
	return seq;
}

/*
 * billing_audit_chain_append
 *		Append one row to a chain (see audit.h).
 */
int64
billing_audit_chain_append(int64 chain, const char *action,
						   const char *object, Jsonb *details,
						   const char *details_text)
{
	return billing_audit_append_at(chain, action, object, details, details_text, 0);
}
