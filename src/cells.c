/*
 * cells.c
 *		Packing and reading the usage cells of billing.usage_deltas (see
 *		cells.h for the format).
 *
 * Ingest writes one delta row per account and flush instead of one per
 * (account, meter, dimension): fewer heap tuples and index entries, and no
 * array or numeric to build per cell.  Readers unpack the rows with
 * billing._delta_cells(); SQL that writes deltas (correct_usage) packs them
 * with billing._delta_pack().
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/int.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"

#include "catalog.h"
#include "cells.h"
#include "util.h"
#include "varint.h"

PG_FUNCTION_INFO_V1(billing_delta_cells);
PG_FUNCTION_INFO_V1(billing_delta_pack);
PG_FUNCTION_INFO_V1(billing_delta_rows);
PG_FUNCTION_INFO_V1(billing_delta_key);
PG_FUNCTION_INFO_V1(billing_delta_first);
PG_FUNCTION_INFO_V1(billing_delta_last);

/* ---------------------------------------------------------------------
 * Writing
 * ---------------------------------------------------------------------
 */

/* 1 in fixed point (CELLS_QTY_SCALE digits), and the largest integer that fits */
#define QTY_ONE				((int128_t) 10000000000 * 10000000000)
#define QTY_MOST_INTEGER	(((int128_t) (~(unsigned __int128) 0 >> 1)) / QTY_ONE)
StaticAssertDecl(CELLS_QTY_SCALE == 20, "QTY_ONE is 10^CELLS_QTY_SCALE");

/* n bytes from p */
static inline void
put_bytes(StringInfo b, const void *p, int n)
{
	if (b->len + n >= b->maxlen)
		enlargeStringInfo(b, n);
	memcpy(b->data + b->len, p, n);
	b->len += n;
}

/* the nbytes low bytes of v, least significant first */
static inline void
put_uint(StringInfo b, uint64 v, int nbytes)
{
#ifdef WORDS_BIGENDIAN
	unsigned char tmp[8];

	for (int i = 0; i < nbytes; i++)
		tmp[i] = (unsigned char) (v >> (8 * i));
	put_bytes(b, tmp, nbytes);
#else
	put_bytes(b, &v, nbytes);
#endif
}

/* an unsigned varint (varint.h) */
static inline void
put_varint(StringInfo b, uint64 v)
{
	unsigned char tmp[BILLING_VARINT_MAX];

	put_bytes(b, tmp, billing_varint_put(tmp, v));
}

/* a signed value as a varint (zigzag: small magnitudes, few bytes) */
static inline void
put_svarint(StringInfo b, int64 v)
{
	put_varint(b, billing_zigzag(v));
}

/* bytes that hold v in two's complement (1..16) */
static inline int
i128_bytes(int128_t v)
{
	unsigned __int128 u = (unsigned __int128) (v < 0 ? ~v : v);
	uint64		hi = (uint64) (u >> 64);
	uint64		lo = (uint64) u;
	int			bits;

	/* significant bits, plus one for the sign */
	if (hi != 0)
		bits = 128 - __builtin_clzll(hi) + 1;
	else if (lo != 0)
		bits = 64 - __builtin_clzll(lo) + 1;
	else
		bits = 1;
	return (bits + 7) / 8;
}

/*
 * billing_cells_begin
 *		Start a packed value at the end of buf.
 */
void
billing_cells_begin(CellWriter *w, StringInfo buf)
{
	w->buf = buf;
	appendStringInfoSpaces(buf, MAXALIGN(buf->len) - buf->len);
	w->start = buf->len;
	appendStringInfoSpaces(buf, VARHDRSZ);
	put_uint(buf, CELLS_VERSION, 1);
	w->count_at = -1;
	w->ncells = 0;
	w->is_last = false;
}

/*
 * close_series
 *		Write the open series' cell count into its header, as a varint in
 *		place of the four bytes kept for it: the cells after it move back
 *		by what the varint does not take, and the flags say so
 *		(CELLS_VARCOUNT).
 */
static void
close_series(CellWriter *w)
{
	unsigned char tmp[BILLING_VARINT_MAX];
	int			n;
	char	   *at;

	if (w->count_at < 0)
		return;
	n = billing_varint_put(tmp, w->ncells);
	Assert(n <= 4);
	at = w->buf->data + w->count_at;
	memmove(at + n, at + 4, w->buf->len - (w->count_at + 4));
	memcpy(at, tmp, n);
	w->buf->len -= 4 - n;
	w->buf->data[w->buf->len] = '\0';
	at[-1] |= CELLS_VARCOUNT;
	w->count_at = -1;
}

/*
 * billing_cells_series
 *		Open the series of one (meter, dimension); the cells added next
 *		belong to it.
 */
void
billing_cells_series(CellWriter *w, const char *meter, int meterlen,
					 const char *dim, int dimlen, bool is_last)
{
	Assert(meterlen > 0 && meterlen < 256 && dimlen >= 0 && dimlen < 65536);
	close_series(w);
	put_uint(w->buf, meterlen, 1);
	put_bytes(w->buf, meter, meterlen);
	put_uint(w->buf, dimlen, 2);
	put_bytes(w->buf, dim, dimlen);
	put_uint(w->buf, is_last ? CELLS_LAST : 0, 1);
	w->count_at = w->buf->len;
	put_uint(w->buf, 0, 4);
	w->ncells = 0;
	w->is_last = is_last;
}

/*
 * billing_cells_add
 *		Add one cell to the open series: the quantity is dec (fixed point,
 *		CELLS_QTY_SCALE digits) when isdec, num otherwise.
 */
void
billing_cells_add(CellWriter *w, TimestampTz bucket_start, int64 events,
				  bool isdec, int128_t dec, Numeric num, TimestampTz last_ts)
{
	int			head = 0;
	int			n = 0;
	int64		t = bucket_start;

	Assert(w->count_at >= 0);
	if (isdec)
	{
		/*
		 * a whole quantity as its integer: 1 takes one byte, not the nine
		 * of 10^20 (the low 20 bits of a multiple of 10^20 are zero, which
		 * saves the division for most fractions)
		 */
		if (((uint64) dec & 0xFFFFF) == 0 && dec % QTY_ONE == 0)
		{
			dec /= QTY_ONE;
			head = CELLS_INTEGER;
		}
		n = i128_bytes(dec);
		head |= n;
	}
	/* the bucket's start in the coarsest unit that holds it exactly */
	if (t % USECS_PER_SEC == 0)
	{
		if (t % USECS_PER_HOUR == 0)
		{
			t /= USECS_PER_HOUR;
			head |= CELLS_HOURS;
		}
		else if (t % USECS_PER_MINUTE == 0)
		{
			t /= USECS_PER_MINUTE;
			head |= CELLS_MINUTES;
		}
		else
		{
			t /= USECS_PER_SEC;
			head |= CELLS_SECONDS;
		}
	}
	put_uint(w->buf, head, 1);
	put_svarint(w->buf, t);
	put_svarint(w->buf, events);
	if (isdec)
	{
		unsigned __int128 u = (unsigned __int128) dec;

		if (n <= 8)
			put_uint(w->buf, (uint64) u, n);
		else
		{
			put_uint(w->buf, (uint64) u, 8);
			put_uint(w->buf, (uint64) (u >> 64), n - 8);
		}
	}
	else
	{
		char	   *s = DatumGetCString(DirectFunctionCall1(numeric_out,
															NumericGetDatum(num)));
		int			len = strlen(s);

		if (len > PG_UINT16_MAX)
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("usage quantity has too many digits")));
		put_uint(w->buf, len, 2);
		put_bytes(w->buf, s, len);
		pfree(s);
	}
	if (w->is_last)
		put_svarint(w->buf, last_ts);
	w->ncells++;
}

/*
 * billing_cells_end
 *		Finish the packed value; returns its offset in the buffer (the
 *		buffer may still move while more values are written).
 */
int
billing_cells_end(CellWriter *w)
{
	close_series(w);
	SET_VARSIZE(w->buf->data + w->start, cells_size(w));
	return w->start;
}

/*
 * billing_group_begin
 *		Start a group row in buf (emptied): the header, the version.
 */
void
billing_group_begin(StringInfo buf)
{
	resetStringInfo(buf);
	appendStringInfoSpaces(buf, VARHDRSZ);
	put_uint(buf, CELLS_GROUPED, 1);
}

/*
 * billing_group_add
 *		Add an account's cells, a version 2 value, to the group row in buf.
 */
void
billing_group_add(StringInfo buf, int64 account_id, bool has_seq, int64 seq,
				  const struct varlena *cells)
{
	const char *data = VARDATA_ANY(cells);
	int			len = VARSIZE_ANY_EXHDR(cells);

	if (len < 1 || (unsigned char) data[0] != CELLS_VERSION)
		elog(ERROR, "only version %d cells go into a group row", CELLS_VERSION);
	put_uint(buf, (uint64) account_id, 8);
	put_uint(buf, has_seq ? CELLS_SEG_SEQ : 0, 1);
	if (has_seq)
		put_uint(buf, (uint64) seq, 8);
	put_uint(buf, len - 1, 4);
	put_bytes(buf, data + 1, len - 1);
}

/*
 * billing_group_end
 *		The group row in buf, as a bytea pointing into buf.
 */
bytea *
billing_group_end(StringInfo buf)
{
	SET_VARSIZE(buf->data, buf->len);
	return (bytea *) buf->data;
}

/* ---------------------------------------------------------------------
 * Reading
 * ---------------------------------------------------------------------
 */

/* the packed value is not what billing writes */
static void
pg_attribute_noreturn()
corrupt(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATA_CORRUPTED),
			 errmsg("packed usage cells are corrupt"),
			 errhint("A row of billing.usage_deltas was written by something other than billing.")));
}

/* the next n bytes */
static inline const unsigned char *
take(CellReader *r, int n)
{
	const unsigned char *p = r->p;

	if (r->end - r->p < n)
		corrupt();
	r->p += n;
	return p;
}

/* the unsigned integer of the nbytes bytes at p, least significant first */
static inline uint64
le_uint(const unsigned char *p, int nbytes)
{
	uint64		v = 0;

	for (int i = 0; i < nbytes; i++)
		v |= (uint64) p[i] << (8 * i);
	return v;
}

/* an unsigned integer of nbytes bytes, least significant first */
static inline uint64
get_uint(CellReader *r, int nbytes)
{
	return le_uint(take(r, nbytes), nbytes);
}

/* a 16-byte two's complement value (version 1) */
static inline int128_t
get_i128(CellReader *r)
{
	uint64		lo = get_uint(r, 8);
	uint64		hi = get_uint(r, 8);

	return (int128_t) (((unsigned __int128) hi << 64) | lo);
}

/* an unsigned varint (varint.h) */
static inline uint64
get_varint(CellReader *r)
{
	uint64		v;

	if (!billing_varint_get(&r->p, r->end, &v))
		corrupt();
	return v;
}

/* a zigzag varint */
static inline int64
get_svarint(CellReader *r)
{
	return billing_unzigzag(get_varint(r));
}

/* n bytes (1..16) of a two's complement value, sign-extended */
static inline int128_t
get_i128_bytes(CellReader *r, int n)
{
	const unsigned char *p = take(r, n);
	unsigned __int128 u = 0;

	for (int i = 0; i < n; i++)
		u |= (unsigned __int128) p[i] << (8 * i);
	if (n < 16 && (p[n - 1] & 0x80))
		u |= ~(unsigned __int128) 0 << (8 * n);
	return (int128_t) u;
}

/*
 * a quantity stored as the numeric's text: u16 length, the text, as
 * numeric_out writes a finite value (an optional minus, digits, and a
 * point followed by digits): anything else is corrupt (XX001), not input
 * numeric_in would refuse with an error of its own or, as NaN, accept
 */
static Numeric
read_text_qty(CellReader *r)
{
	int			len = (int) get_uint(r, 2);
	const char *t = (const char *) take(r, len);
	int			i = (len > 0 && t[0] == '-') ? 1 : 0;
	int			digits = 0;
	char	   *s;

	for (; i < len && t[i] >= '0' && t[i] <= '9'; i++)
		digits++;
	if (digits == 0)
		corrupt();
	if (i < len)
	{
		if (t[i++] != '.' || i == len)
			corrupt();
		for (; i < len; i++)
			if (t[i] < '0' || t[i] > '9')
				corrupt();
	}
	s = pnstrdup(t, len);
	return DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(s),
											   ObjectIdGetDatum(InvalidOid),
											   Int32GetDatum(-1)));
}

/*
 * billing_cells_open
 *		Start reading the packed value data[0..len) (without its varlena
 *		header); raises XX001 unless its version is one this code reads.
 */
void
billing_cells_open(CellReader *r, const char *data, int len)
{
	r->p = (const unsigned char *) data;
	r->end = r->p + len;
	r->version = (int) get_uint(r, 1);
	if (r->version != 1 && r->version != CELLS_VERSION)
		corrupt();
}

/*
 * billing_segments_open
 *		Start reading the accounts of a delta row: row_account and seq (if
 *		has_seq) are its columns, data[0..len) its value (without the
 *		varlena header).  A group row without an account is corrupt.
 */
void
billing_segments_open(DeltaSegments *s, int64 row_account, bool has_seq, int64 seq,
					  const char *data, int len)
{
	s->data = data;
	s->len = len;
	s->row_account = row_account;
	s->row_has_seq = has_seq;
	s->row_seq = seq;
	s->state = 0;
	if (len >= 1 && (unsigned char) data[0] == CELLS_GROUPED)
	{
		s->p = (const unsigned char *) data + 1;
		s->end = (const unsigned char *) data + len;
		s->state = 1;
		if (s->p >= s->end)
			corrupt();
	}
}

/*
 * segment_header
 *		The header of the group row segment at p (its account, flags, seq
 *		and length, see cells.h) into *seg and *len: the first byte of its
 *		series, or NULL when the bytes up to end do not hold a header and
 *		its series as billing writes them.  Raises nothing: the readers
 *		raise XX001 on NULL, billing_delta_span does not.
 */
static inline const unsigned char *
segment_header(const unsigned char *p, const unsigned char *end, DeltaSegment *seg, uint32 *len)
{
	int			flags;
	int			head;

	if (end - p < 8 + 1)
		return NULL;
	seg->account_id = (int64) le_uint(p, 8);
	flags = p[8];
	seg->has_seq = (flags & CELLS_SEG_SEQ) != 0;
	head = 8 + 1 + (seg->has_seq ? 8 : 0) + 4;
	if ((flags & ~CELLS_SEG_SEQ) != 0 || end - p < head)
		return NULL;
	seg->seq = seg->has_seq ? (int64) le_uint(p + 9, 8) : 0;
	*len = (uint32) le_uint(p + head - 4, 4);
	p += head;
	if ((uint64) (end - p) < *len)
		return NULL;
	return p;
}

/*
 * billing_segments_next
 *		The next account of the row into *seg, and a reader of its cells
 *		into *r, or false at the end.  Raises XX001 on a corrupt value.
 */
bool
billing_segments_next(DeltaSegments *s, DeltaSegment *seg, CellReader *r)
{
	uint32		len;

	if (s->state == 0)
	{
		billing_cells_open(r, s->data, s->len);
		seg->account_id = s->row_account;
		seg->has_seq = s->row_has_seq;
		seg->seq = s->row_seq;
		s->state = 2;
		return true;
	}
	if (s->state == 2 || s->p >= s->end)
		return false;
	r->p = segment_header(s->p, s->end, seg, &len);
	if (r->p == NULL)
		corrupt();
	r->end = r->p + len;
	r->version = CELLS_VERSION;
	s->p = r->end;
	return true;
}

/*
 * next_series
 *		The header of the next series into *s, or false at the end of the
 *		value.  The caller then reads its s->ncells cells.  Inlined into
 *		billing_delta_cells; billing_cells_next_series for other modules.
 */
static pg_attribute_always_inline bool
next_series(CellReader *r, CellSeries *s)
{
	int			flags;

	if (r->p >= r->end)
		return false;
	s->meterlen = (int) get_uint(r, 1);
	s->meter = (const char *) take(r, s->meterlen);
	s->dimlen = (int) get_uint(r, 2);
	s->dim = (const char *) take(r, s->dimlen);
	flags = (int) get_uint(r, 1);
	if (flags & CELLS_VARCOUNT)
	{
		uint64		n = get_varint(r);

		if (n > PG_UINT32_MAX)
			corrupt();
		s->ncells = (uint32) n;
	}
	else
		s->ncells = (uint32) get_uint(r, 4);
	if (s->meterlen == 0 || (flags & ~(CELLS_LAST | CELLS_VARCOUNT)) != 0 || s->ncells == 0)
		corrupt();
	s->is_last = (flags & CELLS_LAST) != 0;
	return true;
}

/* t is a timestamp PostgreSQL can hold: in range, or -infinity or infinity */
static inline bool
valid_ts(TimestampTz t)
{
	return IS_VALID_TIMESTAMP(t) || TIMESTAMP_NOT_FINITE(t);
}

/*
 * next_cell
 *		The next cell of series s into *c.  A quantity kept as text (too
 *		large for fixed point) is read into c->num, in the current memory
 *		context.  Inlined into billing_delta_cells; billing_cells_next for
 *		other modules.
 */
static pg_attribute_always_inline void
next_cell(CellReader *r, const CellSeries *s, Cell *c)
{
	c->dec = 0;
	c->num = NULL;
	c->last_ts = 0;
	if (r->version == 1)
	{
		int			kind;

		c->bucket_start = (TimestampTz) get_uint(r, 8);
		c->events = (int64) get_uint(r, 8);
		kind = (int) get_uint(r, 1);
		if (kind == 0)
			c->dec = get_i128(r);
		else if (kind == 1)
			c->num = read_text_qty(r);
		else
			corrupt();
		c->isdec = (kind == 0);
		if (s->is_last)
			c->last_ts = (TimestampTz) get_uint(r, 8);
	}
	else
	{
		int			head = (int) get_uint(r, 1);
		int			qbytes = head & CELLS_QTY_BYTES;
		int64		b;
		int64		unit;

		if (qbytes > 16 || (qbytes == 0 && (head & CELLS_INTEGER)))
			corrupt();
		switch (head & CELLS_TIME_UNIT)
		{
			case CELLS_SECONDS:
				unit = USECS_PER_SEC;
				break;
			case CELLS_MINUTES:
				unit = USECS_PER_MINUTE;
				break;
			case CELLS_HOURS:
				unit = USECS_PER_HOUR;
				break;
			default:
				unit = 1;
				break;
		}
		b = get_svarint(r);
		if (pg_mul_s64_overflow(b, unit, &b))
			corrupt();
		c->bucket_start = (TimestampTz) b;
		c->events = get_svarint(r);
		c->isdec = (qbytes > 0);
		if (c->isdec)
		{
			c->dec = get_i128_bytes(r, qbytes);
			if (head & CELLS_INTEGER)
			{
				/* an integer: back to fixed point, if it fits */
				if (qbytes > 8 || c->dec > QTY_MOST_INTEGER || c->dec < -QTY_MOST_INTEGER)
					corrupt();
				c->dec *= QTY_ONE;
			}
		}
		else
			c->num = read_text_qty(r);
		if (s->is_last)
			c->last_ts = (TimestampTz) get_svarint(r);
	}
	/* a timestamp is finite and in range, or infinite */
	if (!valid_ts(c->bucket_start) || !valid_ts(c->last_ts))
		corrupt();
}

/*
 * billing_cells_next_series
 *		The header of the next series, or false at the end (see
 *		next_series).
 */
bool
billing_cells_next_series(CellReader *r, CellSeries *s)
{
	return next_series(r, s);
}

/*
 * billing_cells_next
 *		The next cell of series s (see next_cell).
 */
void
billing_cells_next(CellReader *r, const CellSeries *s, Cell *c)
{
	next_cell(r, s, c);
}

/*
 * put_cells
 *		Put the cells r reads into the SRF's tuplestore: (meter, dimension,
 *		bucket_start, quantity, events, last_ts), preceded by account_id
 *		and followed by seq when seg is not NULL.  tmp is reset after each
 *		series.
 */
static void
put_cells(ReturnSetInfo *rsinfo, CellReader *r, MemoryContext tmp, const DeltaSegment *seg)
{
	CellSeries	s;
	Datum		all[8];
	bool		allnulls[8] = {false, false, false, false, false, false, false, false};
	Datum	   *values = seg ? all + 1 : all;
	bool	   *nulls = seg ? allnulls + 1 : allnulls;
	MemoryContext old = MemoryContextSwitchTo(tmp);

	if (seg)
	{
		all[0] = Int64GetDatum(seg->account_id);
		all[7] = Int64GetDatum(seg->seq);
		allnulls[7] = !seg->has_seq;
	}
	while (next_series(r, &s))
	{
		values[0] = PointerGetDatum(cstring_to_text_with_len(s.meter, s.meterlen));
		values[1] = PointerGetDatum(cstring_to_text_with_len(s.dim, s.dimlen));
		nulls[5] = !s.is_last;
		for (uint32 i = 0; i < s.ncells; i++)
		{
			Cell		c;

			next_cell(r, &s, &c);
			values[2] = TimestampTzGetDatum(c.bucket_start);
			values[4] = Int64GetDatum(c.events);
			values[3] = NumericGetDatum(c.isdec ? billing_dec_to_numeric(c.dec, CELLS_QTY_SCALE)
										: c.num);
			if (s.is_last)
				values[5] = TimestampTzGetDatum(c.last_ts);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, all, allnulls);
			if (c.isdec)
				pfree(DatumGetPointer(values[3]));
		}
		MemoryContextReset(tmp);
	}
	MemoryContextSwitchTo(old);
}

/*
 * billing._delta_cells(cells bytea)
 *		RETURNS TABLE (meter text, dimension text, bucket_start timestamptz,
 *					   quantity numeric, events bigint, last_ts timestamptz)
 *		The cells of one packed value, of every account of a group row;
 *		last_ts is NULL but for last meters.
 */
Datum
billing_delta_cells(PG_FUNCTION_ARGS)
{
	bytea	   *b = PG_GETARG_BYTEA_PP(0);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	DeltaSegments segs;
	DeltaSegment seg;
	CellReader	r;
	MemoryContext tmp;

	InitMaterializedSRF(fcinfo, 0);
	tmp = AllocSetContextCreate(CurrentMemoryContext, "billing delta cells",
								ALLOCSET_SMALL_SIZES);
	billing_segments_open(&segs, 0, false, 0, VARDATA_ANY(b), VARSIZE_ANY_EXHDR(b));
	while (billing_segments_next(&segs, &seg, &r))
		put_cells(rsinfo, &r, tmp, NULL);
	MemoryContextDelete(tmp);
	return (Datum) 0;
}

/*
 * billing._delta_rows(row_account bigint, row_seq bigint, cells bytea,
 *					   p_account bigint)
 *		RETURNS TABLE (account_id bigint, meter text, dimension text,
 *					   bucket_start timestamptz, quantity numeric,
 *					   events bigint, last_ts timestamptz, seq bigint)
 *		The cells of a row of billing.usage_deltas (its account_id, seq and
 *		cells) with their accounts (a group row holds several); only
 *		p_account's unless it is NULL.  seq is the account's part's (the
 *		arrival order of its values of last meters), or NULL.
 */
Datum
billing_delta_rows(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bytea	   *b;
	bool		one = !PG_ARGISNULL(3);
	int64		want = one ? PG_GETARG_INT64(3) : 0;
	DeltaSegments segs;
	DeltaSegment seg;
	CellReader	r;
	MemoryContext tmp;

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0) || PG_ARGISNULL(2))
		return (Datum) 0;
	b = PG_GETARG_BYTEA_PP(2);
	tmp = AllocSetContextCreate(CurrentMemoryContext, "billing delta cells",
								ALLOCSET_SMALL_SIZES);
	billing_segments_open(&segs, PG_GETARG_INT64(0), !PG_ARGISNULL(1),
						  PG_ARGISNULL(1) ? 0 : PG_GETARG_INT64(1),
						  VARDATA_ANY(b), VARSIZE_ANY_EXHDR(b));
	while (billing_segments_next(&segs, &seg, &r))
		if (!one || seg.account_id == want)
			put_cells(rsinfo, &r, tmp, &seg);
	MemoryContextDelete(tmp);
	return (Datum) 0;
}

/*
 * billing_delta_span
 *		The least and the greatest account with cells in a delta row
 *		(row_account, and data[0..len) its value without the varlena
 *		header): the row's own account for a row of one account (versions
 *		1 and 2), the least and greatest of its segments' for a group row.
 *		It reads the segments' headers only, and never raises: a value
 *		whose version no reader knows (or empty), or a group row whose
 *		headers are not what billing writes, spans every account, so that
 *		every reader of its key still reads it and reports it (XX001).
 */
void
billing_delta_span(int64 row_account, const char *data, int len, int64 *first, int64 *last)
{
	const unsigned char *p = (const unsigned char *) data + 1;
	const unsigned char *end = (const unsigned char *) data + len;
	int64		lo = PG_INT64_MAX;
	int64		hi = PG_INT64_MIN;

	*first = *last = row_account;
	if (len >= 1 && ((unsigned char) data[0] == 1 || (unsigned char) data[0] == CELLS_VERSION))
		return;					/* a row of one account */
	if (len >= 1 && (unsigned char) data[0] == CELLS_GROUPED)
		while (p != NULL && p < end)
		{
			DeltaSegment seg;
			uint32		n;

			p = segment_header(p, end, &seg, &n);
			if (p == NULL)
				break;
			p += n;
			lo = Min(lo, seg.account_id);
			hi = Max(hi, seg.account_id);
		}
	if (p == NULL || lo > hi)
	{
		/* no version a reader knows, or not what billing writes */
		*first = PG_INT64_MIN;
		*last = PG_INT64_MAX;
		return;
	}
	*first = lo;
	*last = hi;
}

/*
 * billing._delta_first(account_id bigint, cells bytea) RETURNS bigint
 * billing._delta_last(account_id bigint, cells bytea) RETURNS bigint
 *		The least and the greatest account with cells in a row of
 *		billing.usage_deltas (billing_delta_span): the second and third
 *		columns of its index, so that a reader of one account skips, in
 *		the index, the group rows of its block that do not hold it.
 */
static int64
delta_span_arg(FunctionCallInfo fcinfo, bool want_last)
{
	bytea	   *b = PG_GETARG_BYTEA_PP(1);
	int64		first,
				last;

	billing_delta_span(PG_GETARG_INT64(0), VARDATA_ANY(b), VARSIZE_ANY_EXHDR(b), &first, &last);
	return want_last ? last : first;
}

Datum
billing_delta_first(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(delta_span_arg(fcinfo, false));
}

Datum
billing_delta_last(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(delta_span_arg(fcinfo, true));
}

/*
 * billing._delta_key(account_id bigint) RETURNS bigint
 *		The account_id of the group rows of billing.usage_deltas that may
 *		hold the account's cells: the account's own where billing is
 *		distributed (no group rows there), so that Citus routes a query
 *		for both keys to the account's shard.
 */
Datum
billing_delta_key(PG_FUNCTION_ARGS)
{
	int64		account = PG_GETARG_INT64(0);

	PG_RETURN_INT64(billing_distributed() ? account : billing_delta_group(account));
}

/* do two texts have the same bytes? */
static bool
same_text(text *a, text *b)
{
	return VARSIZE_ANY_EXHDR(a) == VARSIZE_ANY_EXHDR(b) &&
		memcmp(VARDATA_ANY(a), VARDATA_ANY(b), VARSIZE_ANY_EXHDR(a)) == 0;
}

/*
 * billing._delta_pack(meters text[], dimensions text[],
 *					   bucket_starts timestamptz[], quantities numeric[],
 *					   events bigint[], last_ts timestamptz[]) RETURNS bytea
 *		Pack parallel arrays of cells; a cell whose last_ts is not NULL
 *		belongs to a last meter.  Consecutive cells of the same meter and
 *		dimension share a series.
 */
Datum
billing_delta_pack(PG_FUNCTION_ARGS)
{
	Datum	   *meters,
			   *dims,
			   *starts,
			   *qtys,
			   *events,
			   *lasts = NULL;
	bool	   *lastnull = NULL;
	bool	   *nulls;
	int			n;
	CellWriter	w;
	StringInfoData buf;
	int			prev = -1;

	for (int i = 0; i < 5; i++)
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("only last_ts may be NULL")));
	n = billing_array_elems(PG_GETARG_ARRAYTYPE_P(0), TEXTOID, -1, false, TYPALIGN_INT,
							&meters, &nulls, -1, "meters", false);
	if (billing_array_elems(PG_GETARG_ARRAYTYPE_P(1), TEXTOID, -1, false, TYPALIGN_INT,
							&dims, &nulls, -1, "dimensions", false) != n ||
		billing_array_elems(PG_GETARG_ARRAYTYPE_P(2), TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE,
							&starts, &nulls, -1, "bucket_starts", false) != n ||
		billing_array_elems(PG_GETARG_ARRAYTYPE_P(3), NUMERICOID, -1, false, TYPALIGN_INT,
							&qtys, &nulls, -1, "quantities", false) != n ||
		billing_array_elems(PG_GETARG_ARRAYTYPE_P(4), INT8OID, 8, true, TYPALIGN_DOUBLE,
							&events, &nulls, -1, "events", false) != n ||
		(!PG_ARGISNULL(5) &&
		 billing_array_elems(PG_GETARG_ARRAYTYPE_P(5), TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE,
							 &lasts, &lastnull, -1, "last_ts", true) != n))
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("the cell arrays must have the same length")));

	initStringInfo(&buf);
	billing_cells_begin(&w, &buf);
	for (int i = 0; i < n; i++)
	{
		text	   *m = DatumGetTextPP(meters[i]);
		text	   *d = DatumGetTextPP(dims[i]);
		bool		is_last = lasts != NULL && !lastnull[i];
		Numeric		q = DatumGetNumeric(qtys[i]);
		int128_t	dec = 0;
		bool		isdec;

		if (VARSIZE_ANY_EXHDR(m) == 0 || VARSIZE_ANY_EXHDR(m) > 255 ||
			VARSIZE_ANY_EXHDR(d) > PG_UINT16_MAX)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("meter or dimension too long or empty")));
		if (numeric_is_nan(q) || numeric_is_inf(q))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("usage quantity must be finite")));
		if (prev < 0 || is_last != (lasts != NULL && !lastnull[prev]) ||
			!same_text(m, DatumGetTextPP(meters[prev])) ||
			!same_text(d, DatumGetTextPP(dims[prev])))
			billing_cells_series(&w, VARDATA_ANY(m), VARSIZE_ANY_EXHDR(m),
								 VARDATA_ANY(d), VARSIZE_ANY_EXHDR(d), is_last);
		isdec = billing_dec_from_numeric(q, CELLS_QTY_SCALE, &dec);
		billing_cells_add(&w, DatumGetTimestampTz(starts[i]), DatumGetInt64(events[i]),
						  isdec, dec, q, is_last ? DatumGetTimestampTz(lasts[i]) : 0);
		prev = i;
	}
	PG_RETURN_BYTEA_P((bytea *) (buf.data + billing_cells_end(&w)));
}
