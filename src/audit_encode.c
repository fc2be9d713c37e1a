/*
 * audit_encode.c
 *		The canonical encoding of an audit row and its SHA-256 chain hash
 *		(SPEC section 7), for appends and for billing.verify_audit_log
 *		(billing._audit_encode, _audit_hash, _audit_chain_step).
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

PG_FUNCTION_INFO_V1(billing_audit_encode);
PG_FUNCTION_INFO_V1(billing_audit_hash);
PG_FUNCTION_INFO_V1(billing_audit_chain_step);

/* version tag: the first field of every encoded row */
#define AUDIT_ENCODING_TAG	"billing.audit_log/1"

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
 * billing_audit_encode_fields
 *		The canonical encoding (version 1) of an audit row into buf, from
 *		its fields: actor, action and object as bytes in the server
 *		encoding, details as the text of the jsonb value.
 */
void
billing_audit_encode_fields(StringInfo buf, int64 account_id, int64 seq, TimestampTz at,
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
	billing_audit_encode_fields(buf, PG_GETARG_INT64(first), PG_GETARG_INT64(first + 1),
								PG_GETARG_TIMESTAMPTZ(first + 2),
								VARDATA_ANY(actor), VARSIZE_ANY_EXHDR(actor),
								VARDATA_ANY(action), VARSIZE_ANY_EXHDR(action),
								VARDATA_ANY(object), VARSIZE_ANY_EXHDR(object), json);
	pfree(json);
}

/* the contents of buf as a bytea */
bytea *
billing_audit_bytea(const char *data, int len)
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
	PG_RETURN_BYTEA_P(billing_audit_bytea(buf.data, buf.len));
}

/*
 * billing_audit_sha256
 *		digest = sha256 of data (the caller lays out prev || row in it).
 *		With OpenSSL, the digest is fetched once per backend and its
 *		context reused: PostgreSQL's pg_cryptohash creates a context and
 *		makes OpenSSL 3 look the algorithm up again for every hash, which
 *		cost more than hashing a row.  The same function serves appends and
 *		verify_audit_log.
 */
#ifdef USE_OPENSSL
void
billing_audit_sha256(const char *data, int len, uint8 *digest)
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
void
billing_audit_sha256(const char *data, int len, uint8 *digest)
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
	billing_audit_sha256(buf.data, buf.len, digest);
	pfree(buf.data);
	return billing_audit_bytea((const char *) digest, sizeof(digest));
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
