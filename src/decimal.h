/*
 * decimal.h
 *		Exact fixed-point decimals in 128-bit integers, and their exact
 *		conversion from and to PostgreSQL's numeric.
 *
 * A fixed-point value is an int128 v with an implied scale s: it stands for
 * v / 10^s.  Conversions never round: when a numeric does not fit exactly,
 * they report it and the caller falls back to numeric arithmetic.
 */
#ifndef BILLING_DECIMAL_H
#define BILLING_DECIMAL_H

#include "postgres.h"
#include "utils/numeric.h"

/*
 * Aligned like PostgreSQL's own int128 (c.h): palloc only guarantees
 * MAXALIGN, and a 16-byte-aligned int128 in a palloc'd struct would let the
 * compiler emit aligned vector moves on misaligned memory.
 */
typedef __int128 int128_t
#if defined(pg_attribute_aligned)
			pg_attribute_aligned(MAXIMUM_ALIGNOF)
#endif
		   ;

/* 10^38 - 1 is the largest magnitude we keep; beyond it, use numeric */
#define DEC_MAX_DIGITS	38

extern const int128_t billing_dec_pow10[DEC_MAX_DIGITS + 1];

extern bool billing_dec_from_numeric(Numeric num, int scale, int128_t *out);
extern Numeric billing_dec_to_numeric(int128_t value, int scale);
extern int	billing_dec_to_cstring(int128_t value, int scale, char *buf);
extern bool billing_dec_add(int128_t a, int128_t b, int128_t *out);
extern bool billing_dec_mul(int128_t a, int128_t b, int128_t *out);
extern Numeric billing_numeric_trimmed(Numeric num);

/* what billing_dec_numeric_classify says a numeric is */
#define DEC_NUM_ZERO	0
#define DEC_NUM_POS		1
#define DEC_NUM_NEG		2
#define DEC_NUM_NAN		3
#define DEC_NUM_PINF	4
#define DEC_NUM_NINF	5

extern int	billing_dec_numeric_classify(Numeric num, int *dscale);

/* bytes billing_dec_to_cstring may write: sign, 39 digits, point, NUL */
#define DEC_CSTRING_LEN	48

#endif							/* BILLING_DECIMAL_H */
