/*
 * decimal.c
 *		Exact 128-bit fixed-point decimals and their exact conversion from
 *		and to numeric.  Used wherever a hot loop adds or multiplies
 *		quantities and money (ingest accumulators, rating) so that it does
 *		not palloc a numeric per row; anything that does not fit falls back
 *		to numeric by the caller.
 *
 * Reading a numeric relies on its on-disk format (varlena header, a 16-bit
 * header word carrying sign, display scale and weight in the short form or
 * sign and display scale followed by a 16-bit weight in the long form, then
 * base-10000 digits).  That format is stable across major versions because
 * it is stored on disk.
 */
#include "postgres.h"

#include "common/int.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/numeric.h"

#include "decimal.h"

/* the parts of numeric's on-disk format that we read */
#define NUM_SIGN_MASK		0xC000
#define NUM_NEG				0x4000
#define NUM_SHORT			0x8000
#define NUM_SPECIAL			0xC000
#define NUM_SHORT_SIGN		0x2000
#define NUM_SHORT_WSIGN		0x0040
#define NUM_SHORT_WMASK		0x003F
#define NUM_NBASE			10000
#define NUM_EXT_SIGN_MASK	0xF000
#define NUM_PINF			0xD000
#define NUM_NINF			0xF000
#define NUM_SHORT_DSCALE_MASK	0x1F80
#define NUM_SHORT_DSCALE_SHIFT	7
#define NUM_DSCALE_MASK		0x3FFF

const int128_t billing_dec_pow10[DEC_MAX_DIGITS + 1] = {
	1,
	10,
	100,
	1000,
	10000,
	100000,
	1000000,
	10000000,
	100000000,
	1000000000,
	10000000000LL,
	100000000000LL,
	1000000000000LL,
	10000000000000LL,
	100000000000000LL,
	1000000000000000LL,
	10000000000000000LL,
	100000000000000000LL,
	1000000000000000000LL,
	(int128_t) 1000000000000000000LL * 10,
	(int128_t) 1000000000000000000LL * 100,
	(int128_t) 1000000000000000000LL * 1000,
	(int128_t) 1000000000000000000LL * 10000,
	(int128_t) 1000000000000000000LL * 100000,
	(int128_t) 1000000000000000000LL * 1000000,
	(int128_t) 1000000000000000000LL * 10000000,
	(int128_t) 1000000000000000000LL * 100000000,
	(int128_t) 1000000000000000000LL * 1000000000,
	(int128_t) 1000000000000000000LL * 10000000000LL,
	(int128_t) 1000000000000000000LL * 100000000000LL,
	(int128_t) 1000000000000000000LL * 1000000000000LL,
	(int128_t) 1000000000000000000LL * 10000000000000LL,
	(int128_t) 1000000000000000000LL * 100000000000000LL,
	(int128_t) 1000000000000000000LL * 1000000000000000LL,
	(int128_t) 1000000000000000000LL * 10000000000000000LL,
	(int128_t) 1000000000000000000LL * 100000000000000000LL,
	(int128_t) 1000000000000000000LL * 1000000000000000000LL,
	(int128_t) 1000000000000000000LL * 1000000000000000000LL * 10,
	(int128_t) 1000000000000000000LL * 1000000000000000000LL * 100,
};

#define DEC_LIMIT	billing_dec_pow10[DEC_MAX_DIGITS]	/* exclusive bound on |v| */

/*
 * billing_dec_from_numeric
 *		Convert num exactly to a fixed-point value of the given scale
 *		(0..38).  Returns false when num is NaN or infinite, has non-zero
 *		digits beyond the scale, or is too large (|v| >= 10^38).
 */
bool
billing_dec_from_numeric(Numeric num, int scale, int128_t *out)
{
	const uint16 *p = (const uint16 *) VARDATA_ANY(num);
	int			len = VARSIZE_ANY_EXHDR(num);
	uint16		header = p[0];
	bool		neg;
	int			weight;
	const int16 *digits;
	int			ndigits;
	int128_t	v = 0;
	int			i;

	Assert(scale >= 0 && scale <= DEC_MAX_DIGITS);

	if ((header & NUM_SIGN_MASK) == NUM_SPECIAL)
		return false;
	if ((header & NUM_SIGN_MASK) == NUM_SHORT)
	{
		neg = (header & NUM_SHORT_SIGN) != 0;
		weight = ((header & NUM_SHORT_WSIGN) ? ~NUM_SHORT_WMASK : 0) |
			(header & NUM_SHORT_WMASK);
		digits = (const int16 *) (p + 1);
		ndigits = (len - (int) sizeof(uint16)) / (int) sizeof(int16);
	}
	else
	{
		neg = (header & NUM_SIGN_MASK) == NUM_NEG;
		weight = (int16) p[1];
		digits = (const int16 *) (p + 2);
		ndigits = (len - 2 * (int) sizeof(uint16)) / (int) sizeof(int16);
	}

	/*
	 * Digit i (base 10000) has weight (weight - i): it contributes
	 * d * 10000^(weight - i) * 10^scale = d * 10^(4*(weight - i) + scale).
	 */
	for (i = 0; i < ndigits; i++)
	{
		int			e = 4 * (weight - i) + scale;
		int128_t	d = digits[i];

		if (d == 0)
			continue;
		if (e < 0)
		{
			/* fractional digits beyond the scale must divide out exactly */
			if (e <= -4 || d % billing_dec_pow10[-e] != 0)
				return false;
			d /= billing_dec_pow10[-e];
			e = 0;
		}
		if (e >= DEC_MAX_DIGITS)
			return false;
		/* d < 10^4, so d * 10^e < 10^(e + 4): only large e need a check */
		if (e + 4 > DEC_MAX_DIGITS && d >= DEC_LIMIT / billing_dec_pow10[e])
			return false;
		v += d * billing_dec_pow10[e];
		if (v >= DEC_LIMIT)
			return false;
	}
	*out = neg ? -v : v;
	return true;
}

/*
 * billing_dec_to_cstring
 *		Print value / 10^scale in plain decimal, without trailing fractional
 *		zeros, into buf (DEC_CSTRING_LEN bytes).  Returns the length.
 */
int
billing_dec_to_cstring(int128_t value, int scale, char *buf)
{
	char		tmp[DEC_CSTRING_LEN];
	int			n = 0;
	int			len = 0;
	unsigned __int128 u = value < 0 ? -(unsigned __int128) value : (unsigned __int128) value;
	int			i;

	/* digits, least significant first, at least scale + 1 of them */
	do
	{
		tmp[n++] = '0' + (int) (u % 10);
		u /= 10;
	} while (u != 0 || n <= scale);

	/* drop trailing fractional zeros */
	i = 0;
	while (i < scale && tmp[i] == '0')
		i++;

	if (value < 0)
		buf[len++] = '-';
	for (int k = n - 1; k >= scale; k--)
		buf[len++] = tmp[k];
	if (i < scale)
	{
		buf[len++] = '.';
		for (int k = scale - 1; k >= i; k--)
			buf[len++] = tmp[k];
	}
	buf[len] = '\0';
	return len;
}

/*
 * billing_dec_to_numeric
 *		The numeric equal to value / 10^scale (scale 0..38), with no trailing
 *		fractional zeros.  Builds the numeric's short on-disk form directly
 *		(base-10000 digits aligned on the decimal point), which is what
 *		numeric_in would produce for the same digits, without a round trip
 *		through text: rating calls this once per row.
 */
Numeric
billing_dec_to_numeric(int128_t value, int scale)
{
	unsigned __int128 u;
	uint64		u64;
	char		dig[DEC_CSTRING_LEN];	/* decimal digits, least significant first */
	int			n = 0;
	int			lo;
	int			elo,
				ehi,
				glo,
				ghi;
	int			ndig;
	int16		digits[DEC_CSTRING_LEN / 4 + 2];
	Numeric		result;
	uint16	   *p;
	int			dscale;
	static const int16 p10[4] = {1, 10, 100, 1000};

	Assert(scale >= 0 && scale <= DEC_MAX_DIGITS);
	u = value < 0 ? -(unsigned __int128) value : (unsigned __int128) value;

	/*
	 * An integer below 2^64 (a count read by COPY, a whole quantity): its
	 * base-10000 digits directly, least significant first, without the
	 * trailing zero digits.
	 */
	if (scale == 0 && u != 0 && !(u >> 64))
	{
		int16		g[5];		/* 2^64 < 10000^5 */
		int			ng = 0,
					low = 0;

		u64 = (uint64) u;
		while (u64 != 0)
		{
			g[ng++] = (int16) (u64 % NUM_NBASE);
			u64 /= NUM_NBASE;
		}
		while (g[low] == 0)
			low++;
		ndig = ng - low;
		result = (Numeric) palloc(VARHDRSZ + sizeof(uint16) * (1 + ndig));
		SET_VARSIZE(result, VARHDRSZ + sizeof(uint16) * (1 + ndig));
		p = (uint16 *) VARDATA(result);
		/* weight ng - 1 (at most 4), display scale 0 */
		p[0] = NUM_SHORT | (value < 0 ? NUM_SHORT_SIGN : 0) | (uint16) (ng - 1);
		for (int k = 0; k < ndig; k++)
			p[1 + k] = (uint16) g[ng - 1 - k];
		return result;
	}

	/* decimal digits; 64-bit arithmetic for the common case */
	if (u >> 64)
	{
		unsigned __int128 hi = u / UINT64CONST(10000000000000000000);

		u64 = (uint64) (u - hi * UINT64CONST(10000000000000000000));
		for (int k = 0; k < 19; k++)
		{
			dig[n++] = (char) (u64 % 10);
			u64 /= 10;
		}
		u64 = (uint64) hi;		/* < 2^127 / 10^19 < 2^64 */
	}
	else
		u64 = (uint64) u;
	while (u64 != 0)
	{
		dig[n++] = (char) (u64 % 10);
		u64 /= 10;
	}
	while (n > 0 && dig[n - 1] == 0)
		n--;

	if (n == 0)
	{
		/* zero: no digits, weight 0, positive, scale 0 */
		result = (Numeric) palloc(VARHDRSZ + sizeof(uint16));
		SET_VARSIZE(result, VARHDRSZ + sizeof(uint16));
		p = (uint16 *) VARDATA(result);
		p[0] = NUM_SHORT;
		return result;
	}

	/* lowest non-zero digit; digit k has decimal exponent k - scale */
	lo = 0;
	while (dig[lo] == 0)
		lo++;
	elo = lo - scale;
	ehi = (n - 1) - scale;
	glo = elo >= 0 ? elo / 4 : -((-elo + 3) / 4);
	ghi = ehi >= 0 ? ehi / 4 : -((-ehi + 3) / 4);
	ndig = ghi - glo + 1;
	memset(digits, 0, sizeof(int16) * ndig);
	for (int k = lo; k < n; k++)
	{
		int			e = k - scale;
		int			g = e >= 0 ? e / 4 : -((-e + 3) / 4);

		digits[ghi - g] += dig[k] * p10[e - 4 * g];
	}
	dscale = elo < 0 ? -elo : 0;

	result = (Numeric) palloc(VARHDRSZ + sizeof(uint16) * (1 + ndig));
	SET_VARSIZE(result, VARHDRSZ + sizeof(uint16) * (1 + ndig));
	p = (uint16 *) VARDATA(result);
	p[0] = NUM_SHORT | (value < 0 ? NUM_SHORT_SIGN : 0) |
		(uint16) (dscale << NUM_SHORT_DSCALE_SHIFT) |
		(ghi < 0 ? NUM_SHORT_WSIGN : 0) | (uint16) (ghi & NUM_SHORT_WMASK);
	memcpy(p + 1, digits, sizeof(int16) * ndig);
	return result;
}

/*
 * billing_dec_numeric_classify
 *		Read a numeric's header (packed or not): its kind (DEC_NUM_*) and,
 *		for finite values, its display scale in *dscale.
 */
int
billing_dec_numeric_classify(Numeric num, int *dscale)
{
	const uint16 *p = (const uint16 *) VARDATA_ANY(num);
	int			len = VARSIZE_ANY_EXHDR(num);
	uint16		header = p[0];

	*dscale = 0;
	if ((header & NUM_SIGN_MASK) == NUM_SPECIAL)
	{
		if ((header & NUM_EXT_SIGN_MASK) == NUM_PINF)
			return DEC_NUM_PINF;
		if ((header & NUM_EXT_SIGN_MASK) == NUM_NINF)
			return DEC_NUM_NINF;
		return DEC_NUM_NAN;
	}
	if ((header & NUM_SIGN_MASK) == NUM_SHORT)
	{
		*dscale = (header & NUM_SHORT_DSCALE_MASK) >> NUM_SHORT_DSCALE_SHIFT;
		if (len <= (int) sizeof(uint16))
			return DEC_NUM_ZERO;
		return (header & NUM_SHORT_SIGN) ? DEC_NUM_NEG : DEC_NUM_POS;
	}
	*dscale = header & NUM_DSCALE_MASK;
	if (len <= 2 * (int) sizeof(uint16))
		return DEC_NUM_ZERO;
	return (header & NUM_SIGN_MASK) == NUM_NEG ? DEC_NUM_NEG : DEC_NUM_POS;
}

/*
 * billing_dec_add
 *		*out = a + b; false when the result leaves the 38-digit range.
 */
bool
billing_dec_add(int128_t a, int128_t b, int128_t *out)
{
	int128_t	r = a + b;		/* |a|, |b| < 10^38 < 2^127 / 2: no overflow */

	if (r >= DEC_LIMIT || r <= -DEC_LIMIT)
		return false;
	*out = r;
	return true;
}

/*
 * billing_dec_mul
 *		*out = a * b (scales add up); false when the result leaves the
 *		38-digit range.
 */
bool
billing_dec_mul(int128_t a, int128_t b, int128_t *out)
{
	int128_t	r;

	/* two 64-bit factors: one widening multiply, no overflow possible */
	if (a == (int64) a && b == (int64) b)
		r = (int128_t) (int64) a * (int64) b;
	else if (__builtin_mul_overflow(a, b, &r))
		return false;
	if (r >= DEC_LIMIT || r <= -DEC_LIMIT)
		return false;
	*out = r;
	return true;
}

/*
 * billing_numeric_trimmed
 *		num without trailing fractional zeros (trim_scale).
 */
Numeric
billing_numeric_trimmed(Numeric num)
{
	return DatumGetNumeric(DirectFunctionCall1(numeric_trim_scale,
											   NumericGetDatum(num)));
}
