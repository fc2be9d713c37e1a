/*
 * store.c
 *		Packing and reading the cells of the usage store (see store.h for
 *		the table and the format), and the SQL reader of one row's cells:
 *
 *		billing._day_cells(day timestamptz, cells bytea)
 *			-> SETOF (bucket_start, quantity, events, last_ts, last_seq)
 *
 * which billing.usage_cells (and through it every reader of single cells)
 * uses on one node and on Citus alike.
 */
#include "postgres.h"

#include "common/int.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "decimal.h"
#include "store.h"
#include "varint.h"

PG_FUNCTION_INFO_V1(billing_day_cells);

/* ---------------------------------------------------------------------
 * Writing
 * ---------------------------------------------------------------------
 */

/* an unsigned varint (varint.h) */
static inline void
put_varint(StringInfo b, uint64 v)
{
	unsigned char tmp[BILLING_VARINT_MAX];

	appendBinaryStringInfo(b, (char *) tmp, billing_varint_put(tmp, v));
}

/* a signed value as the varint of its zigzag form */
static inline void
put_svarint(StringInfo b, int64 v)
{
	put_varint(b, billing_zigzag(v));
}

/* a 128-bit signed value as the LEB128 of its zigzag form */
static inline void
put_svarint128(StringInfo b, int128_t v)
{
	unsigned __int128 u = ((unsigned __int128) v << 1) ^ (unsigned __int128) (v >> 127);
	unsigned char tmp[20];
	int			n = 0;

	while (u >= 0x80)
	{
		tmp[n++] = (unsigned char) (u | 0x80);
		u >>= 7;
	}
	tmp[n++] = (unsigned char) u;
	appendBinaryStringInfo(b, (char *) tmp, n);
}

/*
 * billing_store_begin
 *		Start a packed value in buf (reset) for the cells of one row of day
 *		day; is_last: the cells carry last_ts and last_seq.
 */
void
billing_store_begin(StoreWriter *w, StringInfo buf, bool is_last, TimestampTz day)
{
	resetStringInfo(buf);
	appendStringInfoSpaces(buf, VARHDRSZ);
	appendStringInfoChar(buf, (char) STORE_VERSION);
	appendStringInfoChar(buf, (char) (is_last ? STORE_LAST : 0));
	w->buf = buf;
	w->is_last = is_last;
	w->prev = day;
}

/*
 * store_cell
 *		Append one cell whose quantity is coef / 10^scale (text: NULL), or
 *		the text of a numeric (text not NULL).
 */
static void
store_cell(StoreWriter *w, const UsageCell *c, int128_t coef, int scale, const char *text)
{
	StringInfo	b = w->buf;
	int64		off = c->bucket - w->prev;
	int			head;

	Assert(c->bucket >= w->prev);
	head = text ? STORE_TEXT : scale;
	if (off % USECS_PER_SEC == 0)
		off /= USECS_PER_SEC;
	else
		head |= STORE_USECS;
	if (c->events == 1)
		head |= STORE_ONE;
	appendStringInfoChar(b, (char) head);
	put_varint(b, (uint64) off);
	if (c->events != 1)
		put_svarint(b, c->events);
	if (text)
	{
		int			len = strlen(text);

		put_varint(b, (uint64) len);
		appendBinaryStringInfo(b, text, len);
	}
	else
		put_svarint128(b, coef);
	if (w->is_last)
	{
		/* unsigned arithmetic: "unknown" (the minimum) round-trips */
		put_svarint(b, (int64) ((uint64) c->last_ts - (uint64) c->bucket));
		put_svarint(b, c->last_seq);
	}
	w->prev = c->bucket;
}

/*
 * billing_store_add
 *		Append one cell, its quantity the numeric c->num; cells come in
 *		increasing bucket order, all in the row's day.
 */
void
billing_store_add(StoreWriter *w, const UsageCell *c)
{
	int			dscale;
	int			kind;
	int128_t	coef = 0;

	kind = billing_dec_numeric_classify(c->num, &dscale);
	if ((kind == DEC_NUM_ZERO || kind == DEC_NUM_POS || kind == DEC_NUM_NEG) &&
		dscale <= STORE_MAX_SCALE && billing_dec_from_numeric(c->num, dscale, &coef))
		store_cell(w, c, coef, dscale, NULL);
	else
	{
		char	   *s = DatumGetCString(DirectFunctionCall1(numeric_out,
															NumericGetDatum(c->num)));

		store_cell(w, c, 0, 0, s);
		pfree(s);
	}
}

/*
 * billing_store_add_fixed
 *		Append one cell whose quantity is coef / 10^scale with display
 *		scale scale (0..STORE_MAX_SCALE); c->num is not read.
 */
void
billing_store_add_fixed(StoreWriter *w, const UsageCell *c, int64 coef, int scale)
{
	Assert(scale >= 0 && scale <= STORE_MAX_SCALE);
	store_cell(w, c, coef, scale, NULL);
}

/*
 * billing_store_end
 *		The packed value (palloc'd in the buffer's context; the buffer is
 *		left to the caller, which may reset it for the next value).
 */
bytea *
billing_store_end(StoreWriter *w)
{
	bytea	   *v = palloc(w->buf->len);

	memcpy(v, w->buf->data, w->buf->len);
	SET_VARSIZE(v, w->buf->len);
	return v;
}

/* ---------------------------------------------------------------------
 * Reading
 * ---------------------------------------------------------------------
 */

/* the value is not what billing writes */
static void
pg_attribute_noreturn()
corrupt(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATA_CORRUPTED),
			 errmsg("packed usage cells of billing.usage_days are corrupt"),
			 errhint("A row of billing.usage_days was written by something other than billing.")));
}

static inline unsigned char
get_byte(StoreReader *r)
{
	if (r->p >= r->end)
		corrupt();
	return *r->p++;
}

/* an unsigned varint (varint.h) */
static inline uint64
get_varint(StoreReader *r)
{
	uint64		v;

	if (!billing_varint_get(&r->p, r->end, &v))
		corrupt();
	return v;
}

static inline int64
get_svarint(StoreReader *r)
{
	return billing_unzigzag(get_varint(r));
}

static inline int128_t
get_svarint128(StoreReader *r)
{
	unsigned __int128 u = 0;

	for (int shift = 0; shift < 133; shift += 7)
	{
		unsigned char c = get_byte(r);

		u |= (unsigned __int128) (c & 0x7F) << shift;
		if ((c & 0x80) == 0)
			return (int128_t) ((u >> 1) ^ -(u & 1));
	}
	corrupt();
}

/*
 * billing_store_open
 *		Start reading the packed value data[0..len) (without its varlena
 *		header) of a row of day day.
 */
void
billing_store_open(StoreReader *r, const char *data, int len, TimestampTz day)
{
	int			flags;

	r->p = (const unsigned char *) data;
	r->end = r->p + len;
	if (get_byte(r) != STORE_VERSION)
		corrupt();
	flags = get_byte(r);
	if ((flags & ~STORE_LAST) != 0)
		corrupt();
	r->is_last = (flags & STORE_LAST) != 0;
	r->prev = day;
}

/*
 * billing_store_numeric
 *		The numeric coef / 10^dscale with display scale dscale (a quantity
 *		billing_store_next_fixed gave, or a sum of such quantities).
 */
Numeric
billing_store_numeric(int128_t coef, int dscale)
{
	Numeric		n;
	int			got;

	if (dscale > DEC_MAX_DIGITS || coef >= billing_dec_pow10[DEC_MAX_DIGITS] ||
		coef <= -billing_dec_pow10[DEC_MAX_DIGITS])
		corrupt();
	n = billing_dec_to_numeric(coef, dscale);
	/* billing_dec_to_numeric drops trailing fractional zeros: put them back */
	(void) billing_dec_numeric_classify(n, &got);
	if (got != dscale)
		n = DatumGetNumeric(DirectFunctionCall2(numeric_round, NumericGetDatum(n),
												Int32GetDatum(dscale)));
	return n;
}

/*
 * billing_store_next
 *		The next cell into *c (false at the end).  Its quantity is a new
 *		numeric in the current memory context.
 */
bool
billing_store_next(StoreReader *r, UsageCell *c)
{
	int128_t	coef;
	int			scale;

	if (!billing_store_next_fixed(r, c, &coef, &scale))
		return false;
	if (scale >= 0)
		c->num = billing_store_numeric(coef, scale);
	return true;
}

/*
 * billing_store_next_fixed
 *		The next cell into *c (false at the end), its quantity left as it is
 *		written: the integer *coef / 10^*scale, c->num NULL; or, for a
 *		quantity written as text, *scale -1 and c->num a new numeric in the
 *		current memory context.  Summing readers add the integers and make
 *		one numeric (billing_store_numeric).
 */
bool
billing_store_next_fixed(StoreReader *r, UsageCell *c, int128_t *coef, int *scale)
{
	int			head;
	int			form;
	uint64		off;

	if (r->p >= r->end)
		return false;
	head = get_byte(r);
	if ((head & ~(STORE_SCALE | STORE_USECS | STORE_ONE)) != 0)
		corrupt();
	form = head & STORE_SCALE;
	off = get_varint(r);
	if (!(head & STORE_USECS))
	{
		if (off > (uint64) (PG_INT64_MAX / USECS_PER_SEC))
			corrupt();
		off *= USECS_PER_SEC;
	}
	if (off > (uint64) PG_INT64_MAX || pg_add_s64_overflow(r->prev, (int64) off, &c->bucket))
		corrupt();
	c->events = (head & STORE_ONE) ? 1 : get_svarint(r);
	if (form == STORE_TEXT)
	{
		uint64		len = get_varint(r);
		char	   *s;

		if (len > (uint64) (r->end - r->p))
			corrupt();
		s = pnstrdup((const char *) r->p, (Size) len);
		r->p += len;
		c->num = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(s),
													 ObjectIdGetDatum(InvalidOid),
													 Int32GetDatum(-1)));
		pfree(s);
		*scale = -1;
	}
	else
	{
		if (form > STORE_MAX_SCALE)
			corrupt();
		*coef = get_svarint128(r);
		*scale = form;
		c->num = NULL;
		if (*coef >= billing_dec_pow10[DEC_MAX_DIGITS] || *coef <= -billing_dec_pow10[DEC_MAX_DIGITS])
			corrupt();
	}
	if (r->is_last)
	{
		c->last_ts = (TimestampTz) ((uint64) get_svarint(r) + (uint64) c->bucket);
		c->last_seq = get_svarint(r);
	}
	else
	{
		c->last_ts = AGG_NO_TS;
		c->last_seq = AGG_NO_SEQ;
	}
	r->prev = c->bucket;
	return true;
}

/*
 * billing_day_cells
 *		billing._day_cells(day, cells): the cells of one row of
 *		billing.usage_days as rows (bucket_start, quantity, events,
 *		last_ts, last_seq), last_ts and last_seq NULL when unknown.
 */
Datum
billing_day_cells(PG_FUNCTION_ARGS)
{
	TimestampTz day = PG_GETARG_TIMESTAMPTZ(0);
	bytea	   *b = PG_GETARG_BYTEA_PP(1);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	StoreReader r;
	UsageCell	c;
	MemoryContext tmp;
	MemoryContext old;

	InitMaterializedSRF(fcinfo, 0);
	billing_store_open(&r, VARDATA_ANY(b), VARSIZE_ANY_EXHDR(b), day);
	tmp = AllocSetContextCreate(CurrentMemoryContext, "billing day cells",
								ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(tmp);
	while (billing_store_next(&r, &c))
	{
		Datum		values[5];
		bool		nulls[5] = {false, false, false, false, false};

		values[0] = TimestampTzGetDatum(c.bucket);
		values[1] = NumericGetDatum(c.num);
		values[2] = Int64GetDatum(c.events);
		values[3] = TimestampTzGetDatum(c.last_ts);
		nulls[3] = c.last_ts == AGG_NO_TS;
		values[4] = Int64GetDatum(c.last_seq);
		nulls[4] = c.last_seq == AGG_NO_SEQ;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		MemoryContextReset(tmp);
	}
	MemoryContextSwitchTo(old);
	MemoryContextDelete(tmp);
	return (Datum) 0;
}
