/*
 * audit.c
 *		The C half of the audit log (SPEC section 7): the canonical encoding
 *		of an audit row, its SHA-256 chain hash, the acting role, the test
 *		that tells a dump restore from ordinary changes, and the one
 *		definition of appending a row to a chain, which every writer of
 *		the log uses (billing._audit_append and _audit_append_many for the
 *		extension's own tables, the triggers of audited user tables in
 *		src/audit_table.c).
 *
 * The tables (billing.audit_log, billing.audit_heads), the extension's
 * own audit triggers and billing.verify_audit_log are SQL, in
 * sql/install/70_audit.sql.
 *
 * Canonical encoding of a row (version 1), the input of its hash:
 *
 *		field(s) = 4-byte big-endian byte length of s, then s in UTF-8
 *		row      = field("billing.audit_log/1")
 *				   field(account_id as a decimal integer)
 *				   field(seq as a decimal integer)
 *				   field(at in UTC as YYYY-MM-DDTHH:MI:SS.ffffffZ)
 *				   field(actor) field(action) field(object)
 *				   field(details as jsonb's own text output)
 *		hash     = sha256(prev_hash || row), prev_hash of the first row of a
 *				   chain being NULL and hashed as no bytes
 *
 * Nothing in the encoding depends on the session (TimeZone, DateStyle,
 * client encoding), so a restored or replicated copy verifies the same.
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
 *
 * The writes need the rights of the extension's owner.  Callers from SQL
 * must hold them (INSERT on audit_log, UPDATE on audit_heads); the
 * triggers on users' tables are not SECURITY DEFINER: around the append
 * only, the user id switches to the owner of billing.audit_log (with
 * SECURITY_RESTRICTED_OPERATION) and, around the statements it runs,
 * search_path is pinned to pg_catalog, billing, pg_temp, as PostgreSQL's
 * referential-integrity triggers do.
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

#include "audit.h"
#include "billing.h"
#include "catalog.h"
#include "util.h"

PG_FUNCTION_INFO_V1(billing_audit_encode);
PG_FUNCTION_INFO_V1(billing_audit_hash);
PG_FUNCTION_INFO_V1(billing_audit_chain_step);
PG_FUNCTION_INFO_V1(billing_audit_actor);
PG_FUNCTION_INFO_V1(billing_audit_suspended);
PG_FUNCTION_INFO_V1(billing_audit_append);
PG_FUNCTION_INFO_V1(billing_audit_append_many);

/* version tag: the first field of every encoded row */
#define AUDIT_ENCODING_TAG	"billing.audit_log/1"

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

static const char *const log_columns[LOG_NCOLS] = {
	"account_id", "seq", "at", "actor", "action", "object", "details",
	"prev_hash", "hash"
};

/* ---------------------------------------------------------------------
 * Canonical encoding and hash
 * ---------------------------------------------------------------------
 */

/*
 * append_field
 *		Append one length-prefixed field: the byte length as 4 bytes, big
 *		endian, then the bytes of s converted from the server encoding to
 *		UTF-8.
 */
static void
append_field(StringInfo buf, const char *s, int len)
{
	char	   *utf8 = pg_server_to_any(s, len, PG_UTF8);
	int			n = (utf8 == s) ? len : (int) strlen(utf8);
	unsigned char be[4];

	be[0] = (unsigned char) ((uint32) n >> 24);
	be[1] = (unsigned char) ((uint32) n >> 16);
	be[2] = (unsigned char) ((uint32) n >> 8);
	be[3] = (unsigned char) (uint32) n;
	appendBinaryStringInfo(buf, (const char *) be, 4);
	appendBinaryStringInfo(buf, utf8, n);
	if (utf8 != s)
		pfree(utf8);
}

/* append an integer as a decimal field */
static void
append_int8_field(StringInfo buf, int64 v)
{
	char		s[MAXINT8LEN + 1];
	int			len = pg_lltoa(v, s);

	append_field(buf, s, len);
}

/* the decimal digits of v, zero-padded to width, into p; returns the end */
static char *
put_digits(char *p, int v, int width)
{
	for (int i = width - 1; i >= 0; i--)
	{
		p[i] = '0' + v % 10;
		v /= 10;
	}
	return p + width;
}

/*
 * encode_fields
 *		The canonical encoding (version 1) of an audit row into buf, from
 *		its fields: actor, action and object as bytes in the server
 *		encoding, details as the text of the jsonb value.
 */
static void
encode_fields(StringInfo buf, int64 account_id, int64 seq, TimestampTz at,
			  const char *actor, int actorlen, const char *action, int actionlen,
			  const char *object, int objectlen, const char *json)
{
	struct pg_tm tm;
	fsec_t		fsec;
	char		ts[64];

	if (TIMESTAMP_NOT_FINITE(at) ||
		timestamp2tm(at, NULL, &tm, &fsec, NULL, NULL) != 0 ||
		tm.tm_year < 1 || tm.tm_year > 9999)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("audit row time must be between the years 1 and 9999")));
	/* YYYY-MM-DDTHH:MI:SS.ffffffZ */
	{
		char	   *p = ts;

		p = put_digits(p, tm.tm_year, 4);
		*p++ = '-';
		p = put_digits(p, tm.tm_mon, 2);
		*p++ = '-';
		p = put_digits(p, tm.tm_mday, 2);
		*p++ = 'T';
		p = put_digits(p, tm.tm_hour, 2);
		*p++ = ':';
		p = put_digits(p, tm.tm_min, 2);
		*p++ = ':';
		p = put_digits(p, tm.tm_sec, 2);
		*p++ = '.';
		p = put_digits(p, (int) fsec, 6);
		*p++ = 'Z';
		*p = '\0';
	}

	append_field(buf, AUDIT_ENCODING_TAG, strlen(AUDIT_ENCODING_TAG));
	append_int8_field(buf, account_id);
	append_int8_field(buf, seq);
	append_field(buf, ts, strlen(ts));
	append_field(buf, actor, actorlen);
	append_field(buf, action, actionlen);
	append_field(buf, object, objectlen);
	append_field(buf, json, strlen(json));
}

/*
 * encode_row
 *		The canonical encoding of the audit row in args[first] ..
 *		args[first + 6] of fcinfo: account_id, seq, at, actor, action,
 *		object, details; none may be NULL.
 */
static void
encode_row(FunctionCallInfo fcinfo, int first, StringInfo buf)
{
	static const char *const names[] = {
		"account_id", "seq", "at", "actor", "action", "object", "details"
	};
	Jsonb	   *details;
	text	   *actor;
	text	   *action;
	text	   *object;
	char	   *json;

	for (int i = 0; i < 7; i++)
		if (PG_ARGISNULL(first + i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("audit row field \"%s\" must not be null", names[i])));

	details = PG_GETARG_JSONB_P(first + 6);
	json = JsonbToCString(NULL, &details->root, VARSIZE(details));
	actor = PG_GETARG_TEXT_PP(first + 3);
	action = PG_GETARG_TEXT_PP(first + 4);
	object = PG_GETARG_TEXT_PP(first + 5);
	encode_fields(buf, PG_GETARG_INT64(first), PG_GETARG_INT64(first + 1),
				  PG_GETARG_TIMESTAMPTZ(first + 2),
				  VARDATA_ANY(actor), VARSIZE_ANY_EXHDR(actor),
				  VARDATA_ANY(action), VARSIZE_ANY_EXHDR(action),
				  VARDATA_ANY(object), VARSIZE_ANY_EXHDR(object), json);
	pfree(json);
}

/* the contents of buf as a bytea */
static bytea *
buf_to_bytea(const char *data, int len)
{
	bytea	   *b = palloc(VARHDRSZ + len);

	SET_VARSIZE(b, VARHDRSZ + len);
	memcpy(VARDATA(b), data, len);
	return b;
}

/*
 * billing_audit_encode
 *		billing._audit_encode(account_id, seq, at, actor, action, object,
 *		details) RETURNS bytea: the canonical encoding of an audit row.
 */
Datum
billing_audit_encode(PG_FUNCTION_ARGS)
{
	StringInfoData buf;

	initStringInfo(&buf);
	encode_row(fcinfo, 0, &buf);
	PG_RETURN_BYTEA_P(buf_to_bytea(buf.data, buf.len));
}

/*
 * sha256_buf
 *		digest = sha256 of data (the caller lays out prev || row in it).
 *		With OpenSSL, the digest is fetched once per backend and its
 *		context reused: PostgreSQL's pg_cryptohash creates a context and
 *		makes OpenSSL 3 look the algorithm up again for every hash, which
 *		cost more than hashing a row.  The same function serves appends and
 *		verify_audit_log.
 */
#ifdef USE_OPENSSL
static void
sha256_buf(const char *data, int len, uint8 *digest)
{
	static const EVP_MD *md = NULL;
	static EVP_MD_CTX *ctx = NULL;
	unsigned int dlen = 0;

	if (ctx == NULL)
	{
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
		md = EVP_MD_fetch(NULL, "SHA256", NULL);
#else
		md = EVP_sha256();
#endif
		ctx = EVP_MD_CTX_new();
		if (md == NULL || ctx == NULL)
			elog(ERROR, "could not set up SHA-256 for the audit log");
	}
	if (EVP_DigestInit_ex(ctx, md, NULL) != 1 ||
		EVP_DigestUpdate(ctx, data, len) != 1 ||
		EVP_DigestFinal_ex(ctx, digest, &dlen) != 1 ||
		dlen != PG_SHA256_DIGEST_LENGTH)
		elog(ERROR, "could not compute SHA-256 of an audit row");
}
#else
static void
sha256_buf(const char *data, int len, uint8 *digest)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);

	if (pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) data, len) < 0 ||
		pg_cryptohash_final(ctx, digest, PG_SHA256_DIGEST_LENGTH) < 0)
	{
		const char *err = pg_cryptohash_error(ctx);

		pg_cryptohash_free(ctx);
		elog(ERROR, "could not compute SHA-256 of an audit row: %s", err);
	}
	pg_cryptohash_free(ctx);
}
#endif

/*
 * hash_row
 *		sha256(prev || encoding of the row in args[first] ..), prev NULL
 *		counting as no bytes.
 */
static bytea *
hash_row(bytea *prev, FunctionCallInfo fcinfo, int first)
{
	StringInfoData buf;
	uint8		digest[PG_SHA256_DIGEST_LENGTH];

	initStringInfo(&buf);
	if (prev != NULL)
		appendBinaryStringInfo(&buf, VARDATA_ANY(prev), VARSIZE_ANY_EXHDR(prev));
	encode_row(fcinfo, first, &buf);
	sha256_buf(buf.data, buf.len, digest);
	pfree(buf.data);
	return buf_to_bytea((const char *) digest, sizeof(digest));
}

/*
 * billing_audit_hash
 *		billing._audit_hash(prev_hash, account_id, seq, at, actor, action,
 *		object, details) RETURNS bytea: sha256(prev_hash || encoding), a NULL
 *		prev_hash (the first row of a chain) counting as no bytes.
 */
Datum
billing_audit_hash(PG_FUNCTION_ARGS)
{
	PG_RETURN_BYTEA_P(hash_row(PG_ARGISNULL(0) ? NULL : PG_GETARG_BYTEA_PP(0), fcinfo, 1));
}

/*
 * billing_audit_chain_step
 *		Transition function of the aggregate billing._audit_chain(head_hash,
 *		account_id, seq, at, actor, action, object, details), run as a window
 *		aggregate over one chain's new rows in seq order: the state is the
 *		hash of the previous row (head_hash, the chain head's hash, before
 *		the first one), the result the hash of the current row.  (The
 *		appends of 1.0 used it; kept for databases still on 1.0.)
 */
Datum
billing_audit_chain_step(PG_FUNCTION_ARGS)
{
	bytea	   *prev = NULL;

	if (!PG_ARGISNULL(0))
		prev = PG_GETARG_BYTEA_PP(0);
	else if (!PG_ARGISNULL(1))
		prev = PG_GETARG_BYTEA_PP(1);
	PG_RETURN_BYTEA_P(hash_row(prev, fcinfo, 2));
}

/*
 * billing_audit_actor
 *		billing._audit_actor() RETURNS text: the role the client acts as --
 *		the session user, or the role chosen by SET ROLE -- unaffected by
 *		SECURITY DEFINER functions (which change current_user to their
 *		owner).  This is who an audit row names.
 */
Datum
billing_audit_actor(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(GetUserNameFromId(GetOuterUserId(), false)));
}

/*
 * billing_audit_is_suspended
 *		True while a superuser session runs with check_function_bodies off,
 *		which is how pg_dump and pg_restore scripts reload data.  The
 *		reloaded rows come with their audit history (billing.audit_log is
 *		dumped too), so the audit triggers must not log them a second time.
 *		Only a superuser can get here, and a superuser can disable triggers
 *		anyway.
 */
bool
billing_audit_is_suspended(void)
{
	return !check_function_bodies && superuser_arg(GetOuterUserId());
}

/*
 * billing_audit_suspended
 *		billing._audit_suspended() RETURNS boolean:
 *		billing_audit_is_suspended(), for the audit triggers written in SQL.
 */
Datum
billing_audit_suspended(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(billing_audit_is_suspended());
}

/* ---------------------------------------------------------------------
 * Rendering row images
 * ---------------------------------------------------------------------
 */

/*
 * billing_rendering_pin
 *		Row images are rendered as with TimeZone UTC, DateStyle ISO and
 *		IntervalStyle postgres (as the SQL audit triggers' SET clauses do).
 *		When the session's settings render the same already (a zone of
 *		offset 0, ISO dates, postgres intervals: the defaults of a server in
 *		UTC), nothing is changed; else the three are set in a new GUC nest
 *		level, whose number is returned for billing_rendering_unpin.
 */
int
billing_rendering_pin(void)
{
	long		gmtoff;
	int			level;

	if (session_timezone != NULL &&
		pg_get_timezone_offset(session_timezone, &gmtoff) && gmtoff == 0 &&
		DateStyle == USE_ISO_DATES && IntervalStyle == INTSTYLE_POSTGRES)
		return -1;
	level = NewGUCNestLevel();
	(void) set_config_option("TimeZone", "UTC", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("DateStyle", "ISO, YMD", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("IntervalStyle", "postgres", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	return level;
}

/* give back the settings billing_rendering_pin changed */
void
billing_rendering_unpin(int level)
{
	if (level >= 0)
		AtEOXact_GUC(true, level);
}

/* ---------------------------------------------------------------------
 * The relations appends write, and how
 * ---------------------------------------------------------------------
 */

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

static AuditRels rels;

/* the statements of the SQL paths, prepared once per backend */
static SPIPlanPtr lock_plan = NULL;
static SPIPlanPtr create_plan = NULL;
static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr head_plan = NULL;
static SPIPlanPtr flush_plan = NULL;

/*
 * rels_invalidate
 *		Relcache callback: forget what is known about the audit relations
 *		when one of them changes.
 */
static void
rels_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == rels.log_relid || relid == rels.heads_relid)
		rels.valid = false;
}

/*
 * rels_load
 *		Find the audit relations and decide how rows are written: straight
 *		into the heap and the primary key when billing.audit_log is a plain
 *		table as the extension made it (its nine columns, its primary key as
 *		its only index, no triggers or rules on INSERT, not distributed);
 *		through SQL otherwise.
 */
static void
rels_load(void)
{
	static bool registered = false;
	Oid			nsp = get_namespace_oid("billing", false);
	Relation	rel;
	TupleDesc	desc;
	List	   *indexes;
	bool		direct;

	if (rels.valid)
		return;
	if (!registered)
	{
		CacheRegisterRelcacheCallback(rels_invalidate, (Datum) 0);
		registered = true;
	}
	if (rels.cxt == NULL)
		rels.cxt = AllocSetContextCreate(CacheMemoryContext, "billing audit relations",
										 ALLOCSET_SMALL_SIZES);
	MemoryContextReset(rels.cxt);
	rels.index_info = NULL;

	rels.log_relid = get_relname_relid("audit_log", nsp);
	rels.heads_relid = get_relname_relid("audit_heads", nsp);
	if (!OidIsValid(rels.log_relid) || !OidIsValid(rels.heads_relid))
		elog(ERROR, "relations billing.audit_log and billing.audit_heads do not exist");

	rel = table_open(rels.log_relid, AccessShareLock);
	desc = RelationGetDescr(rel);
	rels.owner = rel->rd_rel->relowner;
	rels.natts = desc->natts;

	direct = rel->rd_rel->relkind == RELKIND_RELATION && rel->rd_rules == NULL &&
		(rel->trigdesc == NULL ||
		 !(rel->trigdesc->trig_insert_before_row || rel->trigdesc->trig_insert_after_row ||
		   rel->trigdesc->trig_insert_instead_row ||
		   rel->trigdesc->trig_insert_before_statement ||
		   rel->trigdesc->trig_insert_after_statement));

	/* the nine columns and no other */
	for (int i = 0; i < LOG_NCOLS; i++)
		rels.attnums[i] = InvalidAttrNumber;
	for (int a = 0; a < desc->natts && direct; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);
		int			i;

		if (att->attisdropped)
			continue;
		for (i = 0; i < LOG_NCOLS; i++)
			if (strcmp(NameStr(att->attname), log_columns[i]) == 0)
				break;
		if (i == LOG_NCOLS || att->attgenerated)
			direct = false;
		else
			rels.attnums[i] = att->attnum;
	}
	for (int i = 0; i < LOG_NCOLS && direct; i++)
		if (rels.attnums[i] == InvalidAttrNumber)
			direct = false;

	/* one index, the primary key on plain columns */
	indexes = RelationGetIndexList(rel);
	if (direct && list_length(indexes) == 1 &&
		linitial_oid(indexes) == RelationGetPrimaryKeyIndex(rel))
	{
		Relation	idx = index_open(linitial_oid(indexes), AccessShareLock);
		MemoryContext old = MemoryContextSwitchTo(rels.cxt);
		IndexInfo  *ii = BuildIndexInfo(idx);

		MemoryContextSwitchTo(old);
		if (ii->ii_Expressions != NIL || ii->ii_Predicate != NIL ||
			ii->ii_ExclusionOps != NULL || !idx->rd_index->indimmediate)
			direct = false;
		rels.log_index = RelationGetRelid(idx);
		rels.index_info = ii;
		index_close(idx, AccessShareLock);
	}
	else
		direct = false;
	list_free(indexes);
	table_close(rel, AccessShareLock);

	if (direct && billing_citus_table(rels.log_relid))
		direct = false;
	rels.direct = direct;
	rels.valid = true;
}

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
 * owner_enter
 *		Act as the owner of billing.audit_log, in a security-restricted
 *		operation; with pin_path, also pin search_path (for statements run
 *		through SPI).  owner_leave undoes it.  An error in between is undone
 *		by the (sub)transaction abort, as for PostgreSQL's RI triggers.
 */
static void
owner_enter(OwnerScope *s, bool pin_path)
{
	GetUserIdAndSecContext(&s->save_user, &s->save_sec);
	SetUserIdAndSecContext(rels.owner, s->save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	s->guc_level = -1;
	if (pin_path)
	{
		s->guc_level = NewGUCNestLevel();
		(void) set_config_option("search_path", "pg_catalog, billing, pg_temp",
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
								 true, 0, false);
	}
}

/* back to the caller's user id and settings */
static void
owner_leave(OwnerScope *s)
{
	if (s->guc_level >= 0)
		AtEOXact_GUC(true, s->guc_level);
	SetUserIdAndSecContext(s->save_user, s->save_sec);
}

/*
 * prepare_kept
 *		Prepare and keep one of this file's statements.
 */
static SPIPlanPtr
prepare_kept(const char *sql, int nargs, Oid *types)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, types);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	SPI_keepplan(plan);
	return plan;
}

/* ---------------------------------------------------------------------
 * The chain heads a transaction holds
 * ---------------------------------------------------------------------
 */

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

static MemoryContext rows_cxt = NULL;	/* child of heads_cxt: the details */
static LogRow *rows = NULL;
static int	nrows = 0;
static int	maxrows = 0;
static Size rows_bytes = 0;		/* details buffered, for the memory bound */
static const Interned *last_actor = NULL;	/* the strings of the last row */
static const Interned *last_action = NULL;
static const Interned *last_object = NULL;

/* multi-insert batches of audit_log rows */
#define WRITE_BATCH		1000
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
 * read_head
 *		Lock a chain's head row and read it (SQL, as the owner with
 *		search_path pinned); creates the row of a new chain.  Under
 *		REPEATABLE READ a concurrent append to the chain raises 40001.
 */
static void
read_head(int64 chain, int64 *seq, bool *has_hash, uint8 *hash)
{
	Datum		values[1];
	Oid			types[1] = {INT8OID};
	OwnerScope	scope;
	bool		isnull;
	int			ret;

	owner_enter(&scope, true);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (lock_plan == NULL)
		lock_plan = prepare_kept("SELECT h.seq, h.hash FROM billing.audit_heads h "
								 "WHERE h.account_id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
								 1, types);
	values[0] = Int64GetDatum(chain);
	ret = SPI_execute_plan(lock_plan, values, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not lock audit chain head: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		if (create_plan == NULL)
			create_plan = prepare_kept("INSERT INTO billing.audit_heads (account_id, seq, hash) "
									   "VALUES ($1, 0, NULL) ON CONFLICT (account_id) DO NOTHING",
									   1, types);
		ret = SPI_execute_plan(create_plan, values, NULL, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "could not create audit chain head: %s", SPI_result_code_string(ret));
		ret = SPI_execute_plan(lock_plan, values, NULL, false, 1);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not lock audit chain head: %s", SPI_result_code_string(ret));
		if (SPI_processed == 0)
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("audit chain " INT64_FORMAT " was created by a concurrent transaction",
							chain),
					 errhint("Retry the transaction.")));
	}
	*seq = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	{
		Datum		h = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);

		*has_hash = !isnull;
		if (!isnull)
		{
			bytea	   *b = DatumGetByteaPP(h);

			if (VARSIZE_ANY_EXHDR(b) != PG_SHA256_DIGEST_LENGTH)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("the head of audit chain " INT64_FORMAT " has a hash of %d bytes",
								chain, (int) VARSIZE_ANY_EXHDR(b)),
						 errdetail("A SHA-256 hash has 32 bytes.")));
			memcpy(hash, VARDATA_ANY(b), PG_SHA256_DIGEST_LENGTH);
		}
	}
	SPI_finish();
	owner_leave(&scope);
}

/*
 * head_get
 *		The head of a chain, locked by this transaction (locked and read on
 *		first use).
 */
static ChainHead *
head_get(int64 chain)
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
	read_head(chain, &seq, &has_hash, hash);
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
 * write_rows
 *		Write buffered rows straight into billing.audit_log's heap (one
 *		multi-insert per batch) and primary key, in chain and seq order, as
 *		the executor would, without the executor: the rows satisfy the
 *		table's checks by construction; a duplicate key still raises 23505.
 *		Runs as the extension's owner.
 */
static void
write_rows(LogRow **sorted, int n)
{
	Relation	rel = table_open(rels.log_relid, RowExclusiveLock);
	Relation	idx = index_open(rels.log_index, RowExclusiveLock);
	TupleDesc	desc = RelationGetDescr(rel);
	IndexInfo  *ii = rels.index_info;
	int			nslots = Min(n, WRITE_BATCH);
	TupleTableSlot **slots = palloc(nslots * sizeof(TupleTableSlot *));
	CommandId	cid = GetCurrentCommandId(true);
	MemoryContext batch_cxt = AllocSetContextCreate(CurrentMemoryContext,
													"billing audit write",
													ALLOCSET_DEFAULT_SIZES);
	MemoryContext old;

	for (int i = 0; i < nslots; i++)
		slots[i] = MakeSingleTupleTableSlot(desc, table_slot_callbacks(rel));

	/* one batch's hashes at a time, in memory reused from batch to batch */
	old = MemoryContextSwitchTo(batch_cxt);
	for (int done = 0; done < n; done += nslots)
	{
		int			k = Min(nslots, n - done);

		MemoryContextReset(batch_cxt);

		for (int j = 0; j < k; j++)
		{
			LogRow	   *r = sorted[done + j];
			TupleTableSlot *slot = slots[j];
			Datum	   *v = slot->tts_values;
			bool	   *isnull = slot->tts_isnull;

			ExecClearTuple(slot);
			for (int a = 0; a < desc->natts; a++)
				isnull[a] = true;
#define SET_FIELD(f, d) (v[rels.attnums[f] - 1] = (d), isnull[rels.attnums[f] - 1] = false)
			SET_FIELD(LOG_ACCOUNT_ID, Int64GetDatum(r->chain));
			SET_FIELD(LOG_SEQ, Int64GetDatum(r->seq));
			SET_FIELD(LOG_AT, TimestampTzGetDatum(r->at));
			SET_FIELD(LOG_ACTOR, PointerGetDatum(r->actor->txt));
			SET_FIELD(LOG_ACTION, PointerGetDatum(r->action->txt));
			SET_FIELD(LOG_OBJECT, PointerGetDatum(r->object->txt));
			SET_FIELD(LOG_DETAILS, JsonbPGetDatum(r->details));
			if (r->has_prev)
				SET_FIELD(LOG_PREV_HASH,
						  PointerGetDatum(buf_to_bytea((const char *) r->prev, sizeof(r->prev))));
			SET_FIELD(LOG_HASH,
					  PointerGetDatum(buf_to_bytea((const char *) r->hash, sizeof(r->hash))));
#undef SET_FIELD
			ExecStoreVirtualTuple(slot);
		}
		/* no BulkInsertState: its ring of buffers would make this backend
		 * write out (and flush the WAL of) the pages it just filled */
		table_multi_insert(rel, slots, k, cid, 0, NULL);
		for (int j = 0; j < k; j++)
		{
			Datum		keys[INDEX_MAX_KEYS];
			bool		keynulls[INDEX_MAX_KEYS];

			for (int c = 0; c < ii->ii_NumIndexAttrs; c++)
			{
				AttrNumber	a = ii->ii_IndexAttrNumbers[c];

				keys[c] = slot_getattr(slots[j], a, &keynulls[c]);
			}
			index_insert(idx, keys, keynulls, &slots[j]->tts_tid, rel,
						 UNIQUE_CHECK_YES, false, ii);
		}
	}

	MemoryContextSwitchTo(old);
	MemoryContextDelete(batch_cxt);
	for (int i = 0; i < nslots; i++)
		ExecDropSingleTupleTableSlot(slots[i]);
	pfree(slots);
	index_close(idx, NoLock);
	table_close(rel, NoLock);
}

/*
 * flush_rows
 *		Write into billing.audit_log the buffered rows of the current
 *		subtransaction: the tail of the buffer (rows of enclosing ones wait
 *		for their own statement's end, or the commit).
 */
static void
flush_rows(void)
{
	SubTransactionId cur = GetCurrentSubTransactionId();
	int			first = nrows;
	LogRow	  **sorted;
	OwnerScope	scope;

	while (first > 0 && rows[first - 1].subid == cur)
		first--;
	if (first == nrows)
		return;
	sorted = palloc((nrows - first) * sizeof(LogRow *));
	for (int i = first; i < nrows; i++)
		sorted[i - first] = &rows[i];
	qsort(sorted, nrows - first, sizeof(LogRow *), row_cmp);
	rels_load();
	owner_enter(&scope, false);
	write_rows(sorted, nrows - first);
	owner_leave(&scope);
	pfree(sorted);
	rows_forget(first);
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

	if (heads == NULL)
		return;
	flush_rows();
	if (ndirty == 0)
		return;
	chains = palloc(ndirty * sizeof(Datum));
	seqs = palloc(ndirty * sizeof(Datum));
	hashes = palloc(ndirty * sizeof(Datum));
	for (int i = 0; i < ndirty; i++)
	{
		ChainHead  *e = hash_search(heads, &dirty_chains[i], HASH_FIND, NULL);

		if (e == NULL || !e->listed || e->seq == e->written_seq)
			continue;
		Assert(e->has_hash);
		chains[n] = Int64GetDatum(e->chain);
		seqs[n] = Int64GetDatum(e->seq);
		hashes[n] = PointerGetDatum(buf_to_bytea((const char *) e->hash, sizeof(e->hash)));
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
		rels_load();
		owner_enter(&scope, true);
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (flush_plan == NULL)
			flush_plan = prepare_kept("UPDATE billing.audit_heads h SET seq = u.seq, hash = u.hash "
									  "FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), "
									  "pg_catalog.unnest($3)) AS u(account_id, seq, hash) "
									  "WHERE h.account_id OPERATOR(pg_catalog.=) u.account_id",
									  3, types);
		values[0] = PointerGetDatum(construct_array(chains, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
		values[1] = PointerGetDatum(construct_array(seqs, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
		values[2] = PointerGetDatum(construct_array(hashes, n, BYTEAOID, -1, false, TYPALIGN_INT));
		ret = SPI_execute_plan(flush_plan, values, NULL, false, 0);
		if (ret != SPI_OK_UPDATE || SPI_processed != (uint64) n)
			elog(ERROR, "could not write %d audit chain heads: %s", n, SPI_result_code_string(ret));
		SPI_finish();
		owner_leave(&scope);
	}

	/* written: the heads are clean, in this subtransaction */
	for (int i = 0; i < ndirty; i++)
	{
		ChainHead  *e = hash_search(heads, &dirty_chains[i], HASH_FIND, NULL);

		if (e == NULL || !e->listed)
			continue;
		e->listed = false;
		if (e->seq != e->written_seq)
		{
			head_touch(e);
			e->written_seq = e->seq;
		}
	}
	ndirty = 0;
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
 * append_sql
 *		The append through SQL (Citus, or an audit_log that is not as the
 *		extension made it): lock and read the head, insert the row, write
 *		the head; nothing is kept for the next append.
 */
static int64
append_sql(int64 chain, TimestampTz at, const char *actor, const char *action,
		   const char *object, Jsonb *details, const char *json)
{
	int64		seq;
	bool		has_hash;
	uint8		prev[PG_SHA256_DIGEST_LENGTH];
	uint8		hash[PG_SHA256_DIGEST_LENGTH];
	StringInfoData buf;
	Datum		values[LOG_NCOLS];
	char		nulls[LOG_NCOLS];
	Oid			types[LOG_NCOLS] = {INT8OID, INT8OID, TIMESTAMPTZOID, TEXTOID, TEXTOID,
	TEXTOID, JSONBOID, BYTEAOID, BYTEAOID};
	OwnerScope	scope;
	int			ret;

	read_head(chain, &seq, &has_hash, prev);
	seq++;
	initStringInfo(&buf);
	if (has_hash)
		appendBinaryStringInfo(&buf, (const char *) prev, sizeof(prev));
	encode_fields(&buf, chain, seq, at, actor, strlen(actor), action, strlen(action),
				  object, strlen(object), json);
	sha256_buf(buf.data, buf.len, hash);

	values[LOG_ACCOUNT_ID] = Int64GetDatum(chain);
	values[LOG_SEQ] = Int64GetDatum(seq);
	values[LOG_AT] = TimestampTzGetDatum(at);
	values[LOG_ACTOR] = CStringGetTextDatum(actor);
	values[LOG_ACTION] = CStringGetTextDatum(action);
	values[LOG_OBJECT] = CStringGetTextDatum(object);
	values[LOG_DETAILS] = JsonbPGetDatum(details);
	values[LOG_PREV_HASH] = has_hash ? PointerGetDatum(buf_to_bytea((const char *) prev, sizeof(prev))) : (Datum) 0;
	values[LOG_HASH] = PointerGetDatum(buf_to_bytea((const char *) hash, sizeof(hash)));
	memset(nulls, ' ', sizeof(nulls));
	if (!has_hash)
		nulls[LOG_PREV_HASH] = 'n';

	owner_enter(&scope, true);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (insert_plan == NULL)
		insert_plan = prepare_kept("INSERT INTO billing.audit_log (account_id, seq, at, actor, action, "
								   "object, details, prev_hash, hash) "
								   "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
								   LOG_NCOLS, types);
	ret = SPI_execute_plan(insert_plan, values, nulls, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not write an audit row: %s", SPI_result_code_string(ret));
	if (head_plan == NULL)
	{
		Oid			htypes[3] = {INT8OID, INT8OID, BYTEAOID};

		head_plan = prepare_kept("UPDATE billing.audit_heads SET seq = $2, hash = $3 "
								 "WHERE account_id OPERATOR(pg_catalog.=) $1",
								 3, htypes);
	}
	values[1] = Int64GetDatum(seq);
	values[2] = values[LOG_HASH];
	ret = SPI_execute_plan(head_plan, values, NULL, false, 0);
	if (ret != SPI_OK_UPDATE || SPI_processed != 1)
		elog(ERROR, "could not write the head of audit chain " INT64_FORMAT ": %s",
			 chain, SPI_result_code_string(ret));
	SPI_finish();
	owner_leave(&scope);
	pfree(buf.data);
	return seq;
}

/*
 * audit_append_at
 *		billing_audit_chain_append with a given time stamp (0: the clock),
 *		never earlier than the chain's last row of this transaction.
 */
static int64
audit_append_at(int64 chain, const char *action, const char *object,
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
	rels_load();

	if (!rels.direct)
	{
		if (at == 0)
			at = GetCurrentTimestamp();
		seq = append_sql(chain, at, actor, action, object, details, details_text);
		if (json)
			pfree(json);
		return seq;
	}

	e = head_get(chain);
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
	encode_fields(&buf, chain, seq, at, actor, strlen(actor), action, strlen(action),
				  object, strlen(object), details_text);
	sha256_buf(buf.data, buf.len, r->hash);
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
	return audit_append_at(chain, action, object, details, details_text, 0);
}

/*
 * check_writer
 *		Callers from SQL must be allowed to write the log themselves: the
 *		functions below write it directly, so they check what an INSERT
 *		would (42501 otherwise).
 */
static void
check_writer(void)
{
	rels_load();
	if (pg_class_aclcheck(rels.log_relid, GetUserId(), ACL_INSERT) != ACLCHECK_OK)
		aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_TABLE, "audit_log");
	if (pg_class_aclcheck(rels.heads_relid, GetUserId(), ACL_UPDATE) != ACLCHECK_OK)
		aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_TABLE, "audit_heads");
}

/* the text of a non-null text argument */
static char *
text_arg(FunctionCallInfo fcinfo, int n, const char *name)
{
	if (PG_ARGISNULL(n))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("audit row field \"%s\" must not be null", name)));
	return text_to_cstring(PG_GETARG_TEXT_PP(n));
}

/*
 * chain_is_local
 *		billing._citus_chain_is_local(chain): on Citus, does this node hold
 *		the chain's shard (a trigger on a reference table fires on every
 *		node; only one writes the row)?
 */
static bool
chain_is_local(int64 chain)
{
	Datum		values[1];
	Oid			types[1] = {INT8OID};
	bool		isnull;
	bool		local;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	values[0] = Int64GetDatum(chain);
	if (SPI_execute_with_args("SELECT billing._citus_chain_is_local($1)", 1, types, values,
							  NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not call billing._citus_chain_is_local");
	local = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return !isnull && local;
}

/*
 * billing_audit_append
 *		billing._audit_append(p_chain, p_action, p_object, p_details,
 *		p_on_placement DEFAULT false) RETURNS bigint: add a row to the chain
 *		of p_chain and bring its head row up to date; returns its seq, or
 *		NULL when p_on_placement and a Citus placement leaves the row to the
 *		node holding the chain.  Under REPEATABLE READ or SERIALIZABLE a
 *		concurrent append to the same chain makes this raise 40001.
 */
Datum
billing_audit_append(PG_FUNCTION_ARGS)
{
	int64		chain;
	char	   *action;
	char	   *object;
	Jsonb	   *details;
	int64		seq;

	check_writer();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("audit row field \"%s\" must not be null", "account_id")));
	chain = PG_GETARG_INT64(0);
	action = text_arg(fcinfo, 1, "action");
	object = text_arg(fcinfo, 2, "object");
	if (PG_ARGISNULL(3))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("audit row field \"%s\" must not be null", "details")));
	details = PG_GETARG_JSONB_P(3);
	if (PG_NARGS() > 4 && !PG_ARGISNULL(4) && PG_GETARG_BOOL(4) && !chain_is_local(chain))
		PG_RETURN_NULL();
	seq = billing_audit_chain_append(chain, action, object, details, NULL);
	billing_audit_chain_flush();
	PG_RETURN_INT64(seq);
}

/* order of the rows of _audit_append_many: chain, then key */
typedef struct ManyRow
{
	int64		chain;
	int64		key;
	int			i;				/* index in the arrays */
} ManyRow;

static int
many_row_cmp(const void *a, const void *b)
{
	const ManyRow *x = a;
	const ManyRow *y = b;

	if (x->chain != y->chain)
		return x->chain < y->chain ? -1 : 1;
	if (x->key != y->key)
		return x->key < y->key ? -1 : 1;
	return x->i - y->i;
}

/*
 * billing_audit_append_many
 *		billing._audit_append_many(p_chains, p_keys, p_action, p_objects,
 *		p_details) RETURNS void: _audit_append for many rows at once (one
 *		statement writing adjustments or usage corrections), each chain's in
 *		the order of p_keys (the adjustment or correction ids).  Locks the
 *		chains' heads in account order, appends with one time stamp for the
 *		whole batch and writes each head once.
 */
Datum
billing_audit_append_many(PG_FUNCTION_ARGS)
{
	Datum	   *chains;
	Datum	   *keys;
	Datum	   *objects;
	Datum	   *details;
	bool	   *chain_nulls;
	bool	   *key_nulls;
	bool	   *object_nulls;
	bool	   *detail_nulls;
	char	   *action;
	int			n;
	ManyRow    *rows;
	TimestampTz at;

	check_writer();
	for (int a = 0; a < 5; a++)
		if (PG_ARGISNULL(a))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("_audit_append_many: arguments must not be null")));
	action = text_to_cstring(PG_GETARG_TEXT_PP(2));
	n = billing_array_elems(PG_GETARG_ARRAYTYPE_P(0), INT8OID, 8, true, TYPALIGN_DOUBLE,
							&chains, &chain_nulls, -1, "p_chains", false);
	(void) billing_array_elems(PG_GETARG_ARRAYTYPE_P(1), INT8OID, 8, true, TYPALIGN_DOUBLE,
							   &keys, &key_nulls, n, "p_keys", false);
	(void) billing_array_elems(PG_GETARG_ARRAYTYPE_P(3), TEXTOID, -1, false, TYPALIGN_INT,
							   &objects, &object_nulls, n, "p_objects", false);
	(void) billing_array_elems(PG_GETARG_ARRAYTYPE_P(4), JSONBOID, -1, false, TYPALIGN_INT,
							   &details, &detail_nulls, n, "p_details", false);
	if (n == 0)
		PG_RETURN_VOID();

	rows = palloc(n * sizeof(ManyRow));
	for (int i = 0; i < n; i++)
	{
		rows[i].chain = DatumGetInt64(chains[i]);
		rows[i].key = DatumGetInt64(keys[i]);
		rows[i].i = i;
	}
	qsort(rows, n, sizeof(ManyRow), many_row_cmp);

	/* lock every chain first, in account order (no deadlock between batches) */
	rels_load();
	if (rels.direct)
		for (int i = 0; i < n; i++)
			if (i == 0 || rows[i].chain != rows[i - 1].chain)
				(void) head_get(rows[i].chain);
	at = GetCurrentTimestamp();
	for (int i = 0; i < n; i++)
		(void) audit_append_at(rows[i].chain, action,
							   TextDatumGetCString(objects[rows[i].i]),
							   DatumGetJsonbP(details[rows[i].i]), NULL, at);
	billing_audit_chain_flush();
	PG_RETURN_VOID();
}
