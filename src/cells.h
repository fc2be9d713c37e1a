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
 *			u8 flags (CELLS_LAST: the meter is a last meter, cells carry last_ts)
 *			u32 number of cells, then each cell:
 *				u8 head: the quantity's byte count (CELLS_QTY_BYTES; 0: as
 *				   text) and CELLS_SECONDS (bucket_start in whole seconds)
 *				varint bucket_start (microseconds, or seconds), varint events,
 *				the quantity: that many bytes of an i128 in two's complement,
 *				   fixed point with CELLS_QTY_SCALE digits; or u16 length and
 *				   the numeric as text
 *				varint last_ts (CELLS_LAST only)
 *		A varint is LEB128 of the zigzag form (small magnitudes, few bytes).
 *		Version 1 (still read) had fixed-size cells: i64 bucket_start, i64
 *		events, u8 kind (0: i128 quantity, 1: text), i64 last_ts.
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
#define CELLS_QTY_BYTES		0x1F
#define CELLS_SECONDS		0x20

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
extern bool billing_cells_next_series(CellReader *r, CellSeries *s);
extern void billing_cells_next(CellReader *r, const CellSeries *s, Cell *c);

#endif							/* BILLING_CELLS_H */
