/*
 * price.h
 *		The billing.price type: one pricing rule (unit, package, graduated,
 *		volume, flat or percent, with optional free/min/max/per modifiers), its
 *		unpacked in-memory form, and the rating engine's C entry points for
 *		other modules (invoices, re-rating).
 *
 * Every number in a price is a non-negative exact decimal coef / 10^scale
 * with coef < 10^38 and 0 <= scale <= 20, kept canonical (no trailing
 * fractional zeros: coef is not a multiple of 10 when scale > 0, and zero
 * has scale 0).  The stored form (a varlena, see price.c) is canonical too,
 * so two prices are equal exactly when their stored bytes are equal.
 */
#ifndef BILLING_PRICE_H
#define BILLING_PRICE_H

#include "postgres.h"

#include "fmgr.h"
#include "utils/numeric.h"

#include "decimal.h"

/* limits of the numbers a price holds (SPEC section 1) */
#define PRICE_MAX_DIGITS	38
#define PRICE_MAX_SCALE		20

/*
 * Version byte leading the stored form and the binary (send/recv) form.  A
 * price is written in the lowest version that can hold it: 1 (the 1.0
 * format) unless it has a per modifier, which needs 2 (added in 1.1).
 * Both are read.
 */
#define PRICE_FORMAT_VERSION		1
#define PRICE_FORMAT_VERSION_PER	2

typedef enum PriceModel
{
	PRICE_UNIT = 1,
	PRICE_PACKAGE = 2,
	PRICE_GRADUATED = 3,
	PRICE_VOLUME = 4,
	PRICE_FLAT = 5,
	PRICE_PERCENT = 6
} PriceModel;

#define PRICE_MODEL_MAX		PRICE_PERCENT

/* flags */
#define PRICE_HAS_FREE		0x01
#define PRICE_HAS_MIN		0x02
#define PRICE_HAS_MAX		0x04
#define PRICE_ROUND_DOWN	0x08	/* package only */
#define PRICE_HAS_PER		0x10	/* per N: the quantity is divided by N */
#define PRICE_PER_DOWN		0x20	/* per N round down (default: up) */
#define PRICE_PER_EXACT		0x40	/* per N exact (no rounding) */
#define PRICE_PER_FLAGS		(PRICE_HAS_PER | PRICE_PER_DOWN | PRICE_PER_EXACT)
#define PRICE_FLAGS_ALL		0x7F

/* an exact non-negative decimal: coef / 10^scale */
typedef struct PriceNum
{
	int128_t	coef;
	int			scale;
} PriceNum;

typedef struct PriceTier
{
	bool		inf;			/* the open-ended last tier */
	PriceNum	bound;			/* inclusive upper bound (unless inf) */
	PriceNum	unit;			/* price per unit */
	PriceNum	fee;			/* flat fee of the tier */

	/* filled by billing_price_prepare: */
	int128_t	bound_f;		/* fixed point at Price.fast_scale */
	int128_t	unit_f;
	int128_t	fee_f;
	Numeric		bound_n;		/* NULL when inf */
	Numeric		unit_n;
	Numeric		fee_n;
} PriceTier;

/*
 * The unpacked form of a price.  billing_price_unpack() returns it prepared for
 * rating: every number is also available as a Numeric and, when the price
 * has fast_ok, as a fixed-point int128 at the common scale fast_scale.
 */
typedef struct Price
{
	PriceModel	model;
	int			flags;
	PriceNum	amount;			/* unit, package and flat amount; percent rate */
	PriceNum	size;			/* package size */
	PriceNum	free;
	PriceNum	min;
	PriceNum	max;
	PriceNum	per;			/* per N (> 0) */
	int			ntiers;
	PriceTier  *tiers;

	/* filled by billing_price_prepare: */
	bool		prepared;
	bool		fast_ok;		/* all numbers fit at fast_scale */
	int			fast_scale;		/* largest scale among the numbers */
	int128_t	amount_f;
	int128_t	size_f;
	int128_t	free_f;
	int128_t	min_f;
	int128_t	max_f;
	int128_t	per_f;			/* N at fast_scale (round up/down only) */
	bool		per_inv_ok;		/* exact: 1/N fits in per_inv_f */
	int			per_inv_scale;	/* exact: 1/N = per_inv_f / 10^per_inv_scale */
	int128_t	per_inv_f;
	Numeric		amount_n;
	Numeric		size_n;
	Numeric		free_n;
	Numeric		min_n;
	Numeric		max_n;
	Numeric		per_n;
	Numeric		per_inv_n;		/* exact: 1/N, exactly */
} Price;

/* one row of rate_tiers; NULL pointers are SQL NULLs */
typedef struct PriceTierRow
{
	int			tier;			/* 1-based; 0 for a min/max adjustment */
	Numeric		first_unit;
	Numeric		last_unit;
	Numeric		quantity;
	Numeric		unit_amount;
	Numeric		flat_amount;
	Numeric		amount;
} PriceTierRow;

/* where billing_price_validate found a problem, besides a tier index >= 0 */
#define WHERE_NONE		(-1)
#define WHERE_SIZE		(-2)
#define WHERE_MINMAX	(-3)
#define WHERE_MODEL		(-4)
#define WHERE_PER		(-5)

/* white space of the text form */
static inline bool
price_is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' ||
		c == '\f' || c == '\v';
}

/* is n zero? */
static inline bool
price_num_is_zero(PriceNum n)
{
	return n.coef == 0;
}

/* price.c: numbers, validation, stored form; price_text.c: text form */
extern Price *billing_price_decode(const char *data, Size len);
extern struct varlena *billing_price_encode(const Price *p);
extern Price *billing_price_unpack(struct varlena *datum);
extern void billing_price_prepare(Price *p);
extern const char *billing_price_validate(const Price *p, int *where);
extern char *billing_price_to_cstring(const Price *p);
extern Price *billing_price_parse_cstring(const char *str, bool binary);
extern bool billing_price_num_parse(const char *s, int len, PriceNum *out,
									const char **errmsg);
extern char *billing_price_num_to_cstring(PriceNum n);
extern Numeric billing_price_num_to_numeric(PriceNum n);
extern int	billing_price_num_cmp(PriceNum a, PriceNum b);

/* rate.c: the rating engine */
extern Numeric billing_price_rate_numeric(const Price *p, Numeric q);
extern Numeric billing_price_rate_slow(const Price *p, Numeric q,
									   PriceTierRow *rows, int *nrows);
extern bool billing_price_rate_fast(const Price *p, Numeric q, Numeric *result);
extern void billing_price_check_quantity(Numeric q);

#endif							/* BILLING_PRICE_H */
