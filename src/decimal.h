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
 * PostgreSQL's int128 is declared with 8-byte alignment, so it may live in
 * palloc'd and dynahash memory (a bare __int128 wants 16 and crashes there).
 */
#ifndef HAVE_INT128
#error "billing needs a compiler with 128-bit integers"
#endif
typedef int128 int128_t;

/* 10^38 - 1 is the largest magnitude we keep; beyond it, use numeric */
#define DEC_MAX_DIGITS	38

extern const int128_t dec_pow10[DEC_MAX_DIGITS + 1];

extern bool dec_from_numeric(Numeric num, int scale, int128_t *out);
extern Numeric dec_to_numeric(int128_t value, int scale);
extern int	dec_to_cstring(int128_t value, int scale, char *buf);
extern bool dec_add(int128_t a, int128_t b, int128_t *out);
extern bool dec_mul(int128_t a, int128_t b, int128_t *out);
extern Numeric numeric_trimmed(Numeric num);

/* bytes dec_to_cstring may write: sign, 39 digits, point, NUL */
#define DEC_CSTRING_LEN	48

#endif							/* BILLING_DECIMAL_H */
