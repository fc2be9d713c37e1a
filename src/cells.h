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
 * any architecture.  billing._delta_cells() reads the cells back as rows.
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

extern void cells_begin(CellWriter *w, StringInfo buf);
extern void cells_series(CellWriter *w, const char *meter, int meterlen,
						 const char *dim, int dimlen, bool is_last);
extern void cells_add(CellWriter *w, TimestampTz bucket_start, int64 events,
					  bool isdec, int128_t dec, Numeric num, TimestampTz last_ts);
extern int	cells_end(CellWriter *w);

/* bytes of the value written so far */
#define cells_size(w)	((w)->buf->len - (w)->start)

/* bytes a value is kept under, so a delta row stays out of TOAST */
#define CELLS_ROW_BYTES		1800

#endif							/* BILLING_CELLS_H */
