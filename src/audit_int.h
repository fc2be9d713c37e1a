/*
 * audit_int.h
 *		Private header of the audit chain's C files: the columns of
 *		billing.audit_log, what a backend knows about the audit relations,
 *		the rows buffered for writing, and the functions the files call in
 *		each other.  The interface to the rest of the extension is audit.h.
 *
 * One job per file (the how and why of each in its header):
 *
 *		audit.c			the SQL entry points: _audit_append, _audit_append_many,
 *						_audit_actor, _audit_suspended
 *		audit_encode.c	the canonical encoding of a row and its SHA-256 hash,
 *						_audit_encode, _audit_hash, _audit_chain_step
 *		audit_write.c	the audit relations and how appends write them:
 *						straight into heap and index, or through SQL; acting
 *						as the extension's owner
 *		audit_chain.c	the chain heads a transaction holds, the buffered
 *						rows, the one append, the flush at statement end,
 *						the transaction callbacks
 *		audit_table.c	the triggers audit_table puts on users' tables
 *		audit_render.c	their row images, and the settings of rendering
 */
#ifndef BILLING_AUDIT_INT_H
#define BILLING_AUDIT_INT_H

#include "postgres.h"

#include "common/sha2.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "nodes/execnodes.h"
#include "fmgr.h"
#include "utils/jsonb.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "audit.h"

/* the columns of billing.audit_log, in the order of the 1.0 table */
enum
{
	LOG_ACCOUNT_ID,
	LOG_SEQ,
	LOG_AT,
	LOG_ACTOR,
	LOG_ACTION,
	LOG_OBJECT,
	LOG_DETAILS,
	LOG_PREV_HASH,
	LOG_HASH,
	LOG_NCOLS
};

/*
 * What is known about billing.audit_log and billing.audit_heads in this
 * backend; dropped on any invalidation of either relation (ALTER TABLE,
 * create_distributed_table, DROP EXTENSION) or a full reset.
 */
typedef struct AuditRels
{
	bool		valid;
	Oid			log_relid;
	Oid			heads_relid;
	Oid			owner;			/* owner of billing.audit_log */
	bool		direct;			/* write audit_log rows straight into heap and index */
	Oid			log_index;		/* its one index, the primary key (direct) */
	AttrNumber	attnums[LOG_NCOLS]; /* attribute of each column (direct) */
	int			natts;
	MemoryContext cxt;			/* holds index_info */
	IndexInfo  *index_info;
} AuditRels;

extern AuditRels billing_audit_rels;

/*
 * Switching to the extension's owner around an append or a flush.
 */
typedef struct OwnerScope
{
	Oid			save_user;
	int			save_sec;
	int			guc_level;		/* -1: search_path not pinned */
} OwnerScope;

/*
 * A row appended but not yet written into billing.audit_log.  The rows of
 * a statement are buffered and written together
 * (billing_audit_chain_flush), sorted by chain and seq, with one
 * multi-insert: far cheaper than one heap and index insert per row at a
 * random place of the primary key.  The buffer
 * holds rows in append order; those of the current subtransaction are
 * always its tail (a subtransaction's rows are appended while it is the
 * current one, and go with it when it ends), so an abort cuts them off
 * and a commit relabels them.
 */
typedef struct LogRow
{
	int64		chain;
	int64		seq;
	TimestampTz at;
	SubTransactionId subid;		/* the subtransaction that appended it */
	bool		has_prev;
	const struct Interned *actor;	/* shared strings, in rows_cxt */
	const struct Interned *action;
	const struct Interned *object;
	Jsonb	   *details;		/* a copy in rows_cxt */
	uint8		prev[PG_SHA256_DIGEST_LENGTH];
	uint8		hash[PG_SHA256_DIGEST_LENGTH];
} LogRow;

/* a string the buffered rows share, also as a text datum */
typedef struct Interned
{
	const char *str;
	text	   *txt;
} Interned;

struct ChainHead;

/* audit_encode.c */
extern void billing_audit_encode_fields(StringInfo buf, int64 account_id, int64 seq,
										TimestampTz at, const char *actor, int actorlen,
										const char *action, int actionlen,
										const char *object, int objectlen,
										const char *json);
extern void billing_audit_sha256(const char *data, int len, uint8 *digest);
extern bytea *billing_audit_bytea(const char *data, int len);

/* audit_write.c */
extern void billing_audit_rels_load(void);
extern void billing_audit_owner_enter(OwnerScope *s, bool pin_path);
extern void billing_audit_owner_leave(OwnerScope *s);
extern SPIPlanPtr billing_audit_prepare_kept(const char *sql, int nargs, Oid *types);
extern void billing_audit_read_head(int64 chain, int64 *seq, bool *has_hash, uint8 *hash);
extern int64 billing_audit_append_sql(int64 chain, TimestampTz at, const char *actor,
									  const char *action, const char *object,
									  Jsonb *details, const char *json);
extern void billing_audit_write_rows(LogRow **sorted, int n);

/* audit_chain.c */
extern struct ChainHead *billing_audit_head_get(int64 chain);
extern int64 billing_audit_append_at(int64 chain, const char *action, const char *object,
									 Jsonb *details, const char *details_text, TimestampTz at);

/* audited users' tables: audit_table.c, audit_render.c */
/* how a column's values become jsonb (by the column's base type) */
typedef enum ColKind
{
	COL_INT2,
	COL_INT4,
	COL_INT8,
	COL_NUMERIC,
	COL_BOOL,
	COL_TEXT,					/* text, varchar, char(n) */
	COL_DATETIME,				/* date, timestamp, timestamptz */
	COL_OTHER					/* to_jsonb of the value */
} ColKind;

typedef struct ColPlan
{
	AttrNumber	attnum;
	JsonbValue	key;			/* the column's name */
	ColKind		kind;
	Oid			basetype;
	FmgrInfo   *to_jsonb;		/* COL_OTHER: to_jsonb over the column's type */
} ColPlan;

/*
 * What the row trigger needs about the relation it fires on, set up on its
 * first row of a query (kept in fn_extra, which lives as long as the
 * query).
 */
typedef struct TableAudit
{
	Oid			relid;			/* the relation the trigger fires on */
	char	   *object;			/* the audited table's qualified name */
	AttrNumber	account_att;	/* InvalidAttrNumber: the catalog chain */
	Oid			account_type;
	int			ncols;
	ColPlan    *cols;			/* its columns, in jsonb's order of keys */
	int			nkeys;			/* primary key columns (0: none) */
	int		   *key_cols;		/* their indexes in cols */
	bool		has_other;		/* a column goes through to_jsonb */
} TableAudit;

extern Jsonb *billing_audit_row_details(TableAudit *ta, Relation rel, HeapTuple oldtup,
										HeapTuple newtup, char **text);

#endif							/* BILLING_AUDIT_INT_H */
