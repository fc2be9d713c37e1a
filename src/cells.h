/*
 * cells.h
 *		The packed form of usage counter cells in billing.usage_deltas.cells.
 *
 * A delta row holds the cells one flush counted for one account, packed in
 * a bytea as a run of series, one series per (meter, dimension):
 *
 *		u8 version (CELLS_VERSION)
 *		then, to the end of the value, series:
 *			u8 meter name length, the name
 *			u16 dimension length, the dimension
 *			u8 flags (CELLS_LAST: the meter is a last meter, cells carry
 *			   last_ts; CELLS_VARCOUNT: the count is an unsigned varint)
 *			the number of cells: an unsigned varint, or a u32 (what writers
 *			   before CELLS_VARCOUNT wrote), then each cell:
 *				u8 head: the quantity's byte count (CELLS_QTY_BYTES; 0: as
 *				   text), CELLS_INTEGER (those bytes are the quantity's
 *				   integer value, at most 8 of them), and the unit of
 *				   bucket_start (CELLS_TIME_UNIT: none for microseconds,
 *				   CELLS_SECONDS, CELLS_MINUTES or CELLS_HOURS)
 *				varint bucket_start (in that unit), varint events,
 *				the quantity: that many bytes of an i128 in two's complement,
 *				   fixed point with CELLS_QTY_SCALE digits, or the integer
 *				   (CELLS_INTEGER); or u16 length and the numeric as text
 *				varint last_ts (CELLS_LAST only)
 *		Writers use the smallest form: a varint count, the coarsest unit
 *		that holds bucket_start exactly, the integer of a whole quantity
 *		(one byte for 1, against nine for 10^20).  The older forms (a u32
 *		count, seconds or microseconds, fixed point only) stay readable.
 *		A varint is LEB128 of the zigzag form (small magnitudes, few bytes).
 *		Version 1 (still read) had fixed-size cells: i64 bucket_start, i64
 *		events, u8 kind (0: i128 quantity, 1: text), i64 last_ts.
 *
 * A group row (version CELLS_GROUPED) holds the cells of several accounts
 * of one block of CELLS_GROUP_WIDTH consecutive account ids, so that a
 * flush touching thousands of accounts writes a few hundred rows, not one
 * row and one index entry per account:
 *
 *		u8 version (CELLS_GROUPED)
 *		then, to the end of the value, segments:
 *			i64 account_id
 *			u8 flags (CELLS_SEG_SEQ: an i64 seq follows, the segment's
 *			   arrival order, which a row of one account keeps in its seq
 *			   column)
 *			u32 length, then that many bytes of series as above (the body
 *			   of a version 2 value, without its version byte)
 *
 * Its row's account_id is billing_delta_group() of the accounts in it, its
 * seq is NULL; a row of one account is written as version 2 under the
 * account's own id.
 * Readers of an account look under both keys and keep only its segments
 * (billing_segments_open/next).  The index of usage_deltas also keeps the
 * least and greatest account of each row (billing_delta_span), so that a
 * reader skips, in the index, the rows of its block that cannot hold it.  Group rows are written on one node only:
 * on Citus a row lives on its account's shard.
 *
 * Integers are little-endian whatever the machine, so a dump restores on
 * any architecture.  billing._delta_cells() reads the cells back as rows,
 * with the reader below.  This format is all the file knows: it depends on
 * nothing of ingest, so anything that keeps cells (a compactor, a packed
 * store) can write and read them with it.
 */
#ifndef BILLING_CELLS_H
#define BILLING_CELLS_H

#include "postgres.h"
#include "lib/stringinfo.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "decimal.h"

#define CELLS_VERSION		2
#define CELLS_QTY_SCALE		20
#define CELLS_LAST			0x01
#define CELLS_VARCOUNT		0x02
#define CELLS_QTY_BYTES		0x1F
#define CELLS_INTEGER		0x40
#define CELLS_TIME_UNIT		0xA0
#define CELLS_SECONDS		0x20
#define CELLS_MINUTES		0x80
#define CELLS_HOURS			0xA0
#define CELLS_GROUPED		3
#define CELLS_GROUP_WIDTH	64
#define CELLS_SEG_SEQ		0x01

/* the key of the group rows that may hold an account's cells */
static inline int64
billing_delta_group(int64 account_id)
{
	return account_id & ~(int64) (CELLS_GROUP_WIDTH - 1);
}

/*
 * One packed value being written into buf, a buffer that may hold several
 * (each starts MAXALIGNed, with its varlena header).
 */
typedef struct CellWriter
{
	StringInfo	buf;
	int			start;			/* offset of the value in buf */
	int			count_at;		/* offset of the open series' cell count */
	uint32		ncells;			/* cells in the open series */
	bool		is_last;		/* the open series is of a last meter */
} CellWriter;

extern void billing_cells_begin(CellWriter *w, StringInfo buf);
extern void billing_cells_series(CellWriter *w, const char *meter, int meterlen,
								 const char *dim, int dimlen, bool is_last);
extern void billing_cells_add(CellWriter *w, TimestampTz bucket_start, int64 events,
							  bool isdec, int128_t dec, Numeric num, TimestampTz last_ts);
extern int	billing_cells_end(CellWriter *w);

/* bytes of the value written so far */
#define cells_size(w)	((w)->buf->len - (w)->start)

/* bytes a value is kept under, so a delta row stays out of TOAST */
#define CELLS_ROW_BYTES		1800

/*
 * Reading a packed value: billing_cells_open, then billing_cells_next_series
 * until it returns false, reading each series' ncells cells with
 * billing_cells_next.  Corrupt input raises XX001.
 */
typedef struct CellReader
{
	const unsigned char *p;		/* the next byte to read */
	const unsigned char *end;
	int			version;
} CellReader;

/* the header of one series; the names point into the value */
typedef struct CellSeries
{
	const char *meter;
	int			meterlen;
	const char *dim;
	int			dimlen;
	bool		is_last;		/* cells carry last_ts */
	uint32		ncells;
} CellSeries;

/* one cell */
typedef struct Cell
{
	TimestampTz bucket_start;
	int64		events;
	bool		isdec;			/* the quantity is dec, else num */
	int128_t	dec;			/* fixed point, CELLS_QTY_SCALE digits */
	Numeric		num;
	TimestampTz last_ts;		/* is_last series only */
} Cell;

extern void billing_cells_open(CellReader *r, const char *data, int len);

/*
 * The accounts of a delta row: billing_segments_open with the row's
 * account_id, seq and value, then billing_segments_next gives each account
 * and its seq with a reader of its cells (one, the row's own, unless a
 * group row).
 */
typedef struct DeltaSegments
{
	const unsigned char *p;		/* the next segment (group rows) */
	const unsigned char *end;
	const char *data;			/* the value (other rows) */
	int			len;
	int64		row_account;
	bool		row_has_seq;
	int64		row_seq;
	int			state;			/* 0: first, 1: a group row, 2: done */
} DeltaSegments;

/* one account's part of a delta row */
typedef struct DeltaSegment
{
	int64		account_id;
	bool		has_seq;
	int64		seq;
} DeltaSegment;

extern void billing_segments_open(DeltaSegments *s, int64 row_account, bool has_seq,
								  int64 seq, const char *data, int len);
extern bool billing_segments_next(DeltaSegments *s, DeltaSegment *seg, CellReader *r);

/*
 * The least and the greatest account with cells in a delta row (its
 * account_id and value): what the second and third columns of the index
 * usage_deltas_account hold (billing._delta_first, _delta_last)
 */
extern void billing_delta_span(int64 row_account, const char *data, int len,
							   int64 *first, int64 *last);

/* writing a group row into buf: begin, then add each account's value */
extern void billing_group_begin(StringInfo buf);
extern void billing_group_add(StringInfo buf, int64 account_id, bool has_seq, int64 seq,
							  const struct varlena *cells);
extern bytea *billing_group_end(StringInfo buf);
extern bool billing_cells_next_series(CellReader *r, CellSeries *s);
extern void billing_cells_next(CellReader *r, const CellSeries *s, Cell *c);

#endif							/* BILLING_CELLS_H */
