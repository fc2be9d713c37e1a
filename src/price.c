/*
 * price.c
 *		The billing.price type (SPEC sections 1 and 10.1): its numbers,
 *		validation, the stored form, equality and hashing (the text form,
 *		and the I/O functions built on it, are in price_text.c).
 *
 * Stored form (after the varlena header), all canonical so that equal
 * prices have equal bytes:
 *
 *		uint8	format version: PRICE_FORMAT_VERSION (1) for a price without
 *				a per modifier (the 1.0 format, unchanged), else
 *				PRICE_FORMAT_VERSION_PER (2)
 *		uint8	model (PriceModel)
 *		uint8	flags (PRICE_HAS_FREE | PRICE_HAS_MIN | ...)
 *		uint32	number of tiers, little-endian (0 unless tiered)
 *		numbers of the model:
 *			unit, flat, percent:	amount
 *			package:				size, amount
 *			graduated, volume:		per tier: bound (not for the last tier,
 *									which is always inf), unit, fee
 *		free, min, max, per when their flag is set
 *
 * A number is: uint8 scale (0..20), uint8 n (0..16), then n bytes of the
 * coefficient, little-endian, with no high zero bytes (zero has n = 0).
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"

#include "price.h"

PG_FUNCTION_INFO_V1(billing_price_eq);
PG_FUNCTION_INFO_V1(billing_price_ne);
PG_FUNCTION_INFO_V1(billing_price_hash);
PG_FUNCTION_INFO_V1(billing_price_hash_extended);

/* ---------------------------------------------------------------------
 * Numbers
 * ---------------------------------------------------------------------
 */

/*
 * billing_price_num_parse
 *		Parse exactly len bytes at s as a plain non-negative decimal literal
 *		(digits, optionally a point and more digits; at least one digit).
 *		Leading zeros and trailing fractional zeros are not counted: what
 *		remains must have at most 20 digits after the point and at most 38
 *		digits in all.  On failure returns false with a reason in *errmsg.
 */
bool
billing_price_num_parse(const char *s, int len, PriceNum *out, const char **errmsg)
{
	int			i = 0;
	int			ib,
				ie,
				fb,
				fe;
	int			ndigits = 0;
	int128_t	coef = 0;

	ib = i;
	while (i < len && s[i] >= '0' && s[i] <= '9')
		i++;
	ie = i;
	fb = fe = i;
	if (i < len && s[i] == '.')
	{
		i++;
		fb = i;
		while (i < len && s[i] >= '0' && s[i] <= '9')
			i++;
		fe = i;
	}
	if (i != len || (ie == ib && fe == fb))
	{
		*errmsg = "not a plain decimal number";
		return false;
	}

	/* drop leading zeros and trailing fractional zeros */
	while (ib < ie && s[ib] == '0')
		ib++;
	while (fe > fb && s[fe - 1] == '0')
		fe--;
	if (fe - fb > PRICE_MAX_SCALE)
	{
		*errmsg = "more than 20 digits after the decimal point";
		return false;
	}
	if (ib == ie)
	{
		/* no integer part: leading fractional zeros are not digits kept */
		int			k = fb;

		while (k < fe && s[k] == '0')
			k++;
		ndigits = fe - k;
	}
	else
		ndigits = (ie - ib) + (fe - fb);
	if (ndigits > PRICE_MAX_DIGITS)
	{
		*errmsg = "more than 38 significant digits";
		return false;
	}
	for (int k = ib; k < ie; k++)
		coef = coef * 10 + (s[k] - '0');
	for (int k = fb; k < fe; k++)
		coef = coef * 10 + (s[k] - '0');
	out->coef = coef;
	out->scale = coef == 0 ? 0 : fe - fb;
	return true;
}

/*
 * billing_price_num_to_cstring
 *		The canonical text of a number (no trailing fractional zeros).
 */
char *
billing_price_num_to_cstring(PriceNum n)
{
	char	   *buf = palloc(DEC_CSTRING_LEN);

	billing_dec_to_cstring(n.coef, n.scale, buf);
	return buf;
}

/*
 * billing_price_num_to_numeric
 *		The number as a numeric.
 */
Numeric
billing_price_num_to_numeric(PriceNum n)
{
	return billing_dec_to_numeric(n.coef, n.scale);
}

/*
 * billing_price_num_cmp
 *		Compare two numbers exactly (-1, 0, 1).
 */
int
billing_price_num_cmp(PriceNum a, PriceNum b)
{
	int128_t	x = a.coef,
				y = b.coef;
	int			s = Max(a.scale, b.scale);

	/*
	 * Bring both to scale s.  A coefficient < 10^38 times 10^20 may not fit
	 * in int128, so compare integer parts first, then the fractions.
	 */
	int128_t	xi = x / billing_dec_pow10[a.scale],
				yi = y / billing_dec_pow10[b.scale];

	if (xi != yi)
		return xi < yi ? -1 : 1;
	x = (x % billing_dec_pow10[a.scale]) * billing_dec_pow10[s - a.scale];
	y = (y % billing_dec_pow10[b.scale]) * billing_dec_pow10[s - b.scale];
	if (x != y)
		return x < y ? -1 : 1;
	return 0;
}

/* is n a canonical number? */
static bool
num_is_canonical(PriceNum n)
{
	if (n.scale < 0 || n.scale > PRICE_MAX_SCALE)
		return false;
	if (n.coef < 0 || n.coef >= billing_dec_pow10[PRICE_MAX_DIGITS])
		return false;
	if (n.coef == 0)
		return n.scale == 0;
	if (n.scale > 0 && n.coef % 10 == 0)
		return false;
	return true;
}

/*
 * per_factor
 *		Split the coefficient of n (> 0) into 2^twos * 5^fives * rest and
 *		return rest.  n / 10^scale has a finite decimal reciprocal exactly
 *		when rest is 1.
 */
static int128_t
per_factor(PriceNum n, int *twos, int *fives)
{
	int128_t	c = n.coef;

	*twos = 0;
	*fives = 0;
	Assert(c > 0);
	while (c % 2 == 0)
	{
		c /= 2;
		(*twos)++;
	}
	while (c % 5 == 0)
	{
		c /= 5;
		(*fives)++;
	}
	return c;
}

/* ---------------------------------------------------------------------
 * Validation
 * ---------------------------------------------------------------------
 */

/*
 * billing_price_validate
 *		Check the rules of SPEC section 1 that the grammar alone does not
 *		express.  Returns NULL when p is valid, else a message (lower case,
 *		no period) and in *where what it is about: a tier index, or one of
 *		WHERE_SIZE, WHERE_MINMAX, WHERE_MODEL.
 */
const char *
billing_price_validate(const Price *p, int *where)
{
	*where = WHERE_NONE;
	if (p->model < PRICE_UNIT || p->model > PRICE_MODEL_MAX)
	{
		*where = WHERE_MODEL;
		return "unknown model";
	}
	if ((p->flags & ~PRICE_FLAGS_ALL) != 0 ||
		((p->flags & PRICE_ROUND_DOWN) && p->model != PRICE_PACKAGE) ||
		((p->flags & (PRICE_PER_DOWN | PRICE_PER_EXACT)) &&
		 !(p->flags & PRICE_HAS_PER)) ||
		((p->flags & PRICE_PER_DOWN) && (p->flags & PRICE_PER_EXACT)))
	{
		*where = WHERE_MODEL;
		return "unknown flags";
	}
	if (!num_is_canonical(p->amount) || !num_is_canonical(p->size) ||
		!num_is_canonical(p->free) || !num_is_canonical(p->min) ||
		!num_is_canonical(p->max) || !num_is_canonical(p->per))
	{
		*where = WHERE_MODEL;
		return "a number is out of range";
	}
	if (p->model == PRICE_PACKAGE && price_num_is_zero(p->size))
	{
		*where = WHERE_SIZE;
		return "the package size must be greater than 0";
	}
	if (p->model == PRICE_GRADUATED || p->model == PRICE_VOLUME)
	{
		if (p->ntiers < 1)
		{
			*where = WHERE_MODEL;
			return "a tiered price needs at least one tier";
		}
		for (int i = 0; i < p->ntiers; i++)
		{
			const PriceTier *t = &p->tiers[i];

			*where = i;
			if (!num_is_canonical(t->unit) || !num_is_canonical(t->fee) ||
				(!t->inf && !num_is_canonical(t->bound)))
				return "a number is out of range";
			if (t->inf)
			{
				if (i != p->ntiers - 1)
					return "only the last tier may be inf";
				continue;
			}
			if (price_num_is_zero(t->bound))
				return "tier bounds must be greater than 0";
			if (i > 0 && !p->tiers[i - 1].inf &&
				billing_price_num_cmp(t->bound, p->tiers[i - 1].bound) <= 0)
				return psprintf("tier bound %s is not greater than the previous bound %s",
								billing_price_num_to_cstring(t->bound),
								billing_price_num_to_cstring(p->tiers[i - 1].bound));
			if (i == p->ntiers - 1)
				return psprintf("the last tier must be inf, not %s",
								billing_price_num_to_cstring(t->bound));
		}
	}
	else if (p->ntiers != 0)
	{
		*where = WHERE_MODEL;
		return "only graduated and volume prices have tiers";
	}
	if (p->flags & PRICE_HAS_PER)
	{
		int			twos,
					fives;

		if (price_num_is_zero(p->per))
		{
			*where = WHERE_PER;
			return "the per quantity must be greater than 0";
		}
		if ((p->flags & PRICE_PER_EXACT) &&
			per_factor(p->per, &twos, &fives) != 1)
		{
			*where = WHERE_PER;
			return psprintf("per %s exact does not divide into finite decimals: exact needs a product of 2s and 5s times a power of ten (such as 1000, 1024 or 0.25)",
							billing_price_num_to_cstring(p->per));
		}
	}
	if ((p->flags & PRICE_HAS_MIN) && (p->flags & PRICE_HAS_MAX) &&
		billing_price_num_cmp(p->min, p->max) > 0)
	{
		*where = WHERE_MINMAX;
		return psprintf("min %s is greater than max %s",
						billing_price_num_to_cstring(p->min),
						billing_price_num_to_cstring(p->max));
	}
	*where = WHERE_NONE;
	return NULL;
}

/* ---------------------------------------------------------------------
 * Stored form
 * ---------------------------------------------------------------------
 */

static void
enc_num(StringInfo buf, PriceNum n)
{
	unsigned char bytes[16];
	int			nb = 0;
	unsigned __int128 u = (unsigned __int128) n.coef;

	while (u != 0)
	{
		bytes[nb++] = (unsigned char) (u & 0xFF);
		u >>= 8;
	}
	appendStringInfoChar(buf, (char) n.scale);
	appendStringInfoChar(buf, (char) nb);
	appendBinaryStringInfo(buf, (char *) bytes, nb);
}

/*
 * billing_price_encode
 *		The stored form (a palloc'd varlena) of a valid price.
 */
struct varlena *
billing_price_encode(const Price *p)
{
	StringInfoData buf;
	uint32		n = (uint32) p->ntiers;

	initStringInfo(&buf);
	appendStringInfoSpaces(&buf, VARHDRSZ);
	appendStringInfoChar(&buf, (char) ((p->flags & PRICE_HAS_PER) ?
									   PRICE_FORMAT_VERSION_PER :
									   PRICE_FORMAT_VERSION));
	appendStringInfoChar(&buf, (char) p->model);
	appendStringInfoChar(&buf, (char) p->flags);
	for (int k = 0; k < 4; k++)
		appendStringInfoChar(&buf, (char) ((n >> (8 * k)) & 0xFF));
	switch (p->model)
	{
		case PRICE_UNIT:
		case PRICE_FLAT:
		case PRICE_PERCENT:
			enc_num(&buf, p->amount);
			break;
		case PRICE_PACKAGE:
			enc_num(&buf, p->size);
			enc_num(&buf, p->amount);
			break;
		case PRICE_GRADUATED:
		case PRICE_VOLUME:
			for (int i = 0; i < p->ntiers; i++)
			{
				if (i < p->ntiers - 1)
					enc_num(&buf, p->tiers[i].bound);
				enc_num(&buf, p->tiers[i].unit);
				enc_num(&buf, p->tiers[i].fee);
			}
			break;
	}
	if (p->flags & PRICE_HAS_FREE)
		enc_num(&buf, p->free);
	if (p->flags & PRICE_HAS_MIN)
		enc_num(&buf, p->min);
	if (p->flags & PRICE_HAS_MAX)
		enc_num(&buf, p->max);
	if (p->flags & PRICE_HAS_PER)
		enc_num(&buf, p->per);
	SET_VARSIZE(buf.data, buf.len);
	return (struct varlena *) buf.data;
}

typedef struct Reader
{
	const unsigned char *p;
	const unsigned char *end;
} Reader;

static void
pg_attribute_noreturn()
corrupt(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATA_CORRUPTED),
			 errmsg("corrupt value of type billing.price")));
}

static unsigned char
rd_byte(Reader *r)
{
	if (r->p >= r->end)
		corrupt();
	return *r->p++;
}

static PriceNum
rd_num(Reader *r)
{
	PriceNum	n;
	int			nb;
	unsigned __int128 u = 0;

	n.scale = rd_byte(r);
	nb = rd_byte(r);
	if (nb > 16 || r->end - r->p < nb)
		corrupt();
	for (int k = nb - 1; k >= 0; k--)
		u = (u << 8) | r->p[k];
	r->p += nb;
	n.coef = (int128_t) u;
	if (!num_is_canonical(n))
		corrupt();
	return n;
}

/*
 * billing_price_decode
 *		Unpack the stored form (data, len: the varlena's contents), of
 *		either version.  Checks every length against the buffer; raises
 *		XX001 on corrupt data.
 */
Price *
billing_price_decode(const char *data, Size len)
{
	Reader		r;
	Price	   *p = palloc0(sizeof(Price));
	uint32		n = 0;
	int			version;

	r.p = (const unsigned char *) data;
	r.end = r.p + len;
	version = rd_byte(&r);
	if (version != PRICE_FORMAT_VERSION && version != PRICE_FORMAT_VERSION_PER)
		corrupt();
	p->model = rd_byte(&r);
	p->flags = rd_byte(&r);
	/* version 2 exactly when there is a per modifier (canonical) */
	if ((p->flags & ~PRICE_FLAGS_ALL) != 0 ||
		((p->flags & PRICE_HAS_PER) != 0) !=
		(version == PRICE_FORMAT_VERSION_PER))
		corrupt();
	for (int k = 0; k < 4; k++)
		n |= ((uint32) rd_byte(&r)) << (8 * k);
	if (p->model < PRICE_UNIT || p->model > PRICE_MODEL_MAX ||
		n > len / 4)
		corrupt();
	p->ntiers = (int) n;
	switch (p->model)
	{
		case PRICE_UNIT:
		case PRICE_FLAT:
		case PRICE_PERCENT:
			p->amount = rd_num(&r);
			break;
		case PRICE_PACKAGE:
			p->size = rd_num(&r);
			p->amount = rd_num(&r);
			break;
		case PRICE_GRADUATED:
		case PRICE_VOLUME:
			if (n == 0)
				corrupt();
			p->tiers = palloc0(sizeof(PriceTier) * n);
			for (int i = 0; i < p->ntiers; i++)
			{
				if (i < p->ntiers - 1)
					p->tiers[i].bound = rd_num(&r);
				else
					p->tiers[i].inf = true;
				p->tiers[i].unit = rd_num(&r);
				p->tiers[i].fee = rd_num(&r);
			}
			break;
	}
	if (p->flags & PRICE_HAS_FREE)
		p->free = rd_num(&r);
	if (p->flags & PRICE_HAS_MIN)
		p->min = rd_num(&r);
	if (p->flags & PRICE_HAS_MAX)
		p->max = rd_num(&r);
	if (p->flags & PRICE_HAS_PER)
		p->per = rd_num(&r);
	if (r.p != r.end)
		corrupt();
	return p;
}

/*
 * billing_price_unpack
 *		Detoast, decode and prepare a stored price for rating.
 */
Price *
billing_price_unpack(struct varlena *datum)
{
	struct varlena *v = pg_detoast_datum_packed(datum);
	Price	   *p = billing_price_decode(VARDATA_ANY(v), VARSIZE_ANY_EXHDR(v));

	billing_price_prepare(p);
	return p;
}

/* fixed point of n at scale s (s >= n.scale); false when it does not fit */
static bool
num_at_scale(PriceNum n, int s, int128_t *out)
{
	return billing_dec_mul(n.coef, billing_dec_pow10[s - n.scale], out);
}

/*
 * per_reciprocal
 *		For per N exact: 1/N exactly, as a Numeric (per_inv_n) and, when it
 *		fits, as fixed point (per_inv_f / 10^per_inv_scale, per_inv_ok).
 *		N = c / 10^s with c = 2^a * 5^b (validated), so with k = max(a, b),
 *		1/N = m / 10^(k - s) where m = 2^(k - a) * 5^(k - b).
 */
static void
per_reciprocal(Price *p)
{
	int			twos,
				fives,
				k,
				e,
				r;
	int			base;
	int128_t	mf = 1;
	bool		fits = true;
	Numeric		m = int64_to_numeric(1);
	Numeric		nb;

	if (per_factor(p->per, &twos, &fives) != 1)
		elog(ERROR, "per %s exact has no finite reciprocal",
			 billing_price_num_to_cstring(p->per));
	k = Max(twos, fives);
	base = twos >= fives ? 5 : 2;	/* one of the two exponents is 0 */
	e = twos >= fives ? twos - fives : fives - twos;
	r = k - p->per.scale;

	nb = int64_to_numeric(base);
	for (int i = 0; i < e; i++)
	{
		m = numeric_mul_opt_error(m, nb, NULL);
		if (fits && !billing_dec_mul(mf, base, &mf))
			fits = false;
	}
	/* m / 10^r, in steps the fixed-point helpers can build */
	if (r < 0)
	{
		m = numeric_mul_opt_error(m, billing_dec_to_numeric(billing_dec_pow10[-r], 0), NULL);
		if (fits && !billing_dec_mul(mf, billing_dec_pow10[-r], &mf))
			fits = false;
	}
	else
	{
		for (int left = r; left > 0; left -= DEC_MAX_DIGITS)
			m = numeric_mul_opt_error(m,
									  billing_dec_to_numeric(1, Min(left, DEC_MAX_DIGITS)),
									  NULL);
		if (r > DEC_MAX_DIGITS)
			fits = false;
	}
	p->per_inv_n = billing_numeric_trimmed(m);
	p->per_inv_ok = fits;
	p->per_inv_f = fits ? mf : 0;
	p->per_inv_scale = fits ? Max(r, 0) : 0;
}

/*
 * billing_price_prepare
 *		Fill the rating caches of p: each number as a Numeric, and, when all
 *		of them fit at the largest scale among them, as fixed point.  For
 *		per N exact, 1/N (a finite decimal) both ways; N itself does not
 *		take part in the common scale then.
 */
void
billing_price_prepare(Price *p)
{
	int			s = 0;
	bool		ok = true;

	if (p->prepared)
		return;
	s = Max(s, p->amount.scale);
	s = Max(s, p->size.scale);
	s = Max(s, p->free.scale);
	s = Max(s, p->min.scale);
	s = Max(s, p->max.scale);
	if ((p->flags & PRICE_HAS_PER) && !(p->flags & PRICE_PER_EXACT))
		s = Max(s, p->per.scale);
	for (int i = 0; i < p->ntiers; i++)
	{
		s = Max(s, p->tiers[i].bound.scale);
		s = Max(s, p->tiers[i].unit.scale);
		s = Max(s, p->tiers[i].fee.scale);
	}
	p->fast_scale = s;
	ok &= num_at_scale(p->amount, s, &p->amount_f);
	ok &= num_at_scale(p->size, s, &p->size_f);
	ok &= num_at_scale(p->free, s, &p->free_f);
	ok &= num_at_scale(p->min, s, &p->min_f);
	ok &= num_at_scale(p->max, s, &p->max_f);
	if ((p->flags & PRICE_HAS_PER) && !(p->flags & PRICE_PER_EXACT))
		ok &= num_at_scale(p->per, s, &p->per_f);
	p->amount_n = billing_price_num_to_numeric(p->amount);
	p->size_n = billing_price_num_to_numeric(p->size);
	p->free_n = billing_price_num_to_numeric(p->free);
	p->min_n = billing_price_num_to_numeric(p->min);
	p->max_n = billing_price_num_to_numeric(p->max);
	p->per_n = billing_price_num_to_numeric(p->per);
	if (p->flags & PRICE_PER_EXACT)
		per_reciprocal(p);
	for (int i = 0; i < p->ntiers; i++)
	{
		PriceTier  *t = &p->tiers[i];

		if (!t->inf)
			ok &= num_at_scale(t->bound, s, &t->bound_f);
		ok &= num_at_scale(t->unit, s, &t->unit_f);
		ok &= num_at_scale(t->fee, s, &t->fee_f);
		t->bound_n = t->inf ? NULL : billing_price_num_to_numeric(t->bound);
		t->unit_n = billing_price_num_to_numeric(t->unit);
		t->fee_n = billing_price_num_to_numeric(t->fee);
	}
	p->fast_ok = ok;
	p->prepared = true;
}

/* ---------------------------------------------------------------------
 * SQL-callable equality and hashing
 * ---------------------------------------------------------------------
 */

/* are the stored forms of arguments 0 and 1 equal? */
static bool
price_args_equal(FunctionCallInfo fcinfo)
{
	struct varlena *a = PG_DETOAST_DATUM_PACKED(PG_GETARG_DATUM(0));
	struct varlena *b = PG_DETOAST_DATUM_PACKED(PG_GETARG_DATUM(1));

	return VARSIZE_ANY_EXHDR(a) == VARSIZE_ANY_EXHDR(b) &&
		memcmp(VARDATA_ANY(a), VARDATA_ANY(b), VARSIZE_ANY_EXHDR(a)) == 0;
}

/*
 * price_eq, price_ne: equality of canonical forms
 */
Datum
billing_price_eq(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(price_args_equal(fcinfo));
}

Datum
billing_price_ne(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(!price_args_equal(fcinfo));
}

/*
 * price_hash, price_hash_extended: hash of the canonical stored bytes
 */
Datum
billing_price_hash(PG_FUNCTION_ARGS)
{
	struct varlena *v = PG_DETOAST_DATUM_PACKED(PG_GETARG_DATUM(0));

	return hash_any((unsigned char *) VARDATA_ANY(v), VARSIZE_ANY_EXHDR(v));
}

Datum
billing_price_hash_extended(PG_FUNCTION_ARGS)
{
	struct varlena *v = PG_DETOAST_DATUM_PACKED(PG_GETARG_DATUM(0));

	return hash_any_extended((unsigned char *) VARDATA_ANY(v),
							 VARSIZE_ANY_EXHDR(v), PG_GETARG_INT64(1));
}
