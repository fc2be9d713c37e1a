/*
 * store.h
 *		The packed usage store (issue 16): compacted usage in one table,
 *
 *		billing.usage_days (account_id, meter, day, dimension,
 *							quantity, events, last_ts, last_seq, cells)
 *
 * one row per account, meter, UTC day and dimension that has cells: the
 * day's total (quantity, events, last_ts, last_seq: every cell of the day
 * folded by the meter's aggregation, src/agg.c) and cells, the day's cells
 * packed in increasing bucket order.  A cell belongs to the UTC day that
 * holds its bucket's start.  Period totals read whole days from the totals
 * and decode the cells of the days at a period's edges only.
 *
 * A packed value, integers little-endian:
 *
 *		u8 version (STORE_VERSION)
 *		u8 flags (STORE_LAST: the cells carry last_ts and last_seq)
 *		then cells, to the end of the value, in increasing bucket order:
 *			u8 head: STORE_SCALE bits: the quantity's display scale s
 *			   (0..STORE_MAX_SCALE), the quantity being the integer c / 10^s
 *			   written as a zigzag varint of up to 128 bits; STORE_TEXT:
 *			   the numeric's text instead (varint length, the text);
 *			   STORE_USECS: the bucket offset is in microseconds, else
 *			   whole seconds; STORE_ONE: the cell counts one event (no
 *			   events field)
 *			varint bucket start minus the previous cell's (the first: minus
 *			   the row's day), in seconds or microseconds
 *			svarint events (unless STORE_ONE)
 *			the quantity
 *			STORE_LAST only: svarint last_ts minus the bucket start
 *			   (microseconds), svarint last_seq
 *		A varint is unsigned LEB128; an svarint the varint of the zigzag
 *		form.  An unknown last_ts or last_seq (AGG_NO_TS, AGG_NO_SEQ)
 *		round-trips.
 *
 * A minute cell of a sum meter with one report of a small whole quantity
 * takes 3 bytes.  The quantity keeps its display scale: 3.0 reads back as
 * 3.0, as the numeric arithmetic of agg.c gave it.
 */
#ifndef BILLING_STORE_H
#define BILLING_STORE_H

#include "postgres.h"

#include "lib/stringinfo.h"

#include "agg.h"
#include "decimal.h"

#define STORE_VERSION		1
#define STORE_LAST			0x01

#define STORE_SCALE			0x1F
#define STORE_TEXT			0x1F
#define STORE_MAX_SCALE		30
#define STORE_USECS			0x20
#define STORE_ONE			0x40

/* the UTC day holding a timestamp */
#define STORE_DAY(ts)		billing_bin_start((ts), USECS_PER_DAY)

/* a packed value being read */
typedef struct StoreReader
{
	const unsigned char *p;
	const unsigned char *end;
	bool		is_last;
	TimestampTz prev;			/* the previous cell's bucket (or the day) */
} StoreReader;

/* a packed value being written */
typedef struct StoreWriter
{
	StringInfo	buf;
	bool		is_last;
	TimestampTz prev;
} StoreWriter;

extern void billing_store_begin(StoreWriter *w, StringInfo buf, bool is_last, TimestampTz day);
extern void billing_store_add(StoreWriter *w, const UsageCell *c);
extern void billing_store_add_fixed(StoreWriter *w, const UsageCell *c, int64 coef, int scale);
extern bytea *billing_store_end(StoreWriter *w);

extern void billing_store_open(StoreReader *r, const char *data, int len, TimestampTz day);
extern bool billing_store_next(StoreReader *r, UsageCell *c);
extern bool billing_store_next_fixed(StoreReader *r, UsageCell *c, int128_t *coef, int *scale);
extern Numeric billing_store_numeric(int128_t coef, int dscale);

#endif							/* BILLING_STORE_H */
