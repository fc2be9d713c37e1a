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
 *				i64 bucket_start, i64 events,
 *				u8 kind, then the quantity:
 *					CELLS_QTY_DEC: i128, fixed point with CELLS_QTY_SCALE digits
 *					CELLS_QTY_TEXT: u16 length, the numeric as text
 *				i64 last_ts (CELLS_LAST only)
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

#define CELLS_VERSION		1
#define CELLS_QTY_SCALE		20
#define CELLS_LAST			0x01
#define CELLS_QTY_DEC		0
#define CELLS_QTY_TEXT		1

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
