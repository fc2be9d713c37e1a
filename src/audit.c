/*
 * audit.c
 *		The C half of the audit log (SPEC section 7): the canonical encoding
 *		of an audit row, its SHA-256 chain hash, the acting role, and the
 *		test that tells a dump restore from ordinary changes.
 *
 * The chain itself (billing.audit_log, billing.audit_heads, the append
 * under a per-chain row lock, the triggers and billing.verify_audit_log)
 * is SQL, in sql/install/70_audit.sql.
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
 */
#include "postgres.h"

#include "common/cryptohash.h"
#include "common/sha2.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "billing.h"

PG_FUNCTION_INFO_V1(billing_audit_encode);
PG_FUNCTION_INFO_V1(billing_audit_hash);
PG_FUNCTION_INFO_V1(billing_audit_chain_step);
PG_FUNCTION_INFO_V1(billing_audit_actor);
PG_FUNCTION_INFO_V1(billing_audit_suspended);

/* version tag: the first field of every encoded row */
#define AUDIT_ENCODING_TAG	"billing.audit_log/1"

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

/* append a text datum as a field */
static void
append_text_field(StringInfo buf, text *t)
{
	append_field(buf, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
}

/* append an integer as a decimal field */
static void
append_int8_field(StringInfo buf, int64 v)
{
	char		s[32];

	snprintf(s, sizeof(s), INT64_FORMAT, v);
	append_field(buf, s, strlen(s));
}

/*
 * encode_row
 *		The canonical encoding (version 1) of an audit row into buf.  The
 *		arguments are args[first] .. args[first + 6] of fcinfo: account_id,
 *		seq, at, actor, action, object, details; none may be NULL.
 */
static void
encode_row(FunctionCallInfo fcinfo, int first, StringInfo buf)
{
	static const char *const names[] = {
		"account_id", "seq", "at", "actor", "action", "object", "details"
	};
	TimestampTz at;
	struct pg_tm tm;
	fsec_t		fsec;
	char		ts[64];
	Jsonb	   *details;
	char	   *json;

	for (int i = 0; i < 7; i++)
		if (PG_ARGISNULL(first + i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("audit row field \"%s\" must not be null", names[i])));

	at = PG_GETARG_TIMESTAMPTZ(first + 2);
	if (TIMESTAMP_NOT_FINITE(at) ||
		timestamp2tm(at, NULL, &tm, &fsec, NULL, NULL) != 0 ||
		tm.tm_year < 1 || tm.tm_year > 9999)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("audit row time must be between the years 1 and 9999")));
	snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ",
			 tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min,
			 tm.tm_sec, (int) fsec);

	details = PG_GETARG_JSONB_P(first + 6);
	json = JsonbToCString(NULL, &details->root, VARSIZE(details));

	append_field(buf, AUDIT_ENCODING_TAG, strlen(AUDIT_ENCODING_TAG));
	append_int8_field(buf, PG_GETARG_INT64(first));
	append_int8_field(buf, PG_GETARG_INT64(first + 1));
	append_field(buf, ts, strlen(ts));
	append_text_field(buf, PG_GETARG_TEXT_PP(first + 3));
	append_text_field(buf, PG_GETARG_TEXT_PP(first + 4));
	append_text_field(buf, PG_GETARG_TEXT_PP(first + 5));
	append_field(buf, json, strlen(json));
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
 * hash_row
 *		sha256(prev || encoding of the row in args[first] ..), prev NULL
 *		counting as no bytes.
 */
static bytea *
hash_row(bytea *prev, FunctionCallInfo fcinfo, int first)
{
	StringInfoData buf;
	pg_cryptohash_ctx *ctx;
	uint8		digest[PG_SHA256_DIGEST_LENGTH];

	initStringInfo(&buf);
	if (prev != NULL)
		appendBinaryStringInfo(&buf, VARDATA_ANY(prev), VARSIZE_ANY_EXHDR(prev));
	encode_row(fcinfo, first, &buf);

	ctx = pg_cryptohash_create(PG_SHA256);
	if (pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) buf.data, buf.len) < 0 ||
		pg_cryptohash_final(ctx, digest, sizeof(digest)) < 0)
	{
		const char *err = pg_cryptohash_error(ctx);

		pg_cryptohash_free(ctx);
		elog(ERROR, "could not compute SHA-256 of an audit row: %s", err);
	}
	pg_cryptohash_free(ctx);
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
 *		the first one), the result the hash of the current row.
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
 * billing_audit_suspended
 *		billing._audit_suspended() RETURNS boolean: true while a superuser
 *		session runs with check_function_bodies off, which is how pg_dump
 *		and pg_restore scripts reload data.  The reloaded rows come with
 *		their audit history (billing.audit_log is dumped too), so the
 *		audit triggers must not log them a second time.  Only a superuser
 *		can get here, and a superuser can disable triggers anyway.
 */
Datum
billing_audit_suspended(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(!check_function_bodies && superuser_arg(GetOuterUserId()));
}
