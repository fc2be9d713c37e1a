/*
 * rate.c
 *		The rating engine: rate(p, q), rate_tiers(p, q) and the C entry point
 *		billing_price_rate_numeric() for other modules.
 *
 * Two implementations compute the same exact amount:
 *
 *	- the fast path works on 128-bit fixed point.  The price's numbers are
 *	  kept at the largest scale among them (sp), the quantity is read at its
 *	  display scale (sq) and converted by a per modifier (a whole number of
 *	  N after round up/down, sq = 0; q times 1/N for exact, sq plus the
 *	  scale of 1/N); quantities are compared at s = max(sp, sq) and
 *	  amounts are carried at scale s + sp (+ 2 for percent).  Every
 *	  operation checks for overflow beyond 38 digits, and any overflow (or a
 *	  quantity that does not fit) makes it give up;
 *	- the numeric path does the same arithmetic on numeric, which is exact
 *	  for addition, subtraction and multiplication; package counts and per
 *	  N round up/down use integer division and remainder, per N exact
 *	  multiplies by 1/N (a finite decimal), and percent multiplies by 0.01.
 *
 * rate() tries the fast path and falls back to the numeric path.  Results
 * carry no trailing fractional zeros, so both paths print identically.
 * billing._rate_numeric() (numeric path only) and billing._rate_fast()
 * (fast path, NULL when it gives up) are internal, for tests.
 *
 * A constant price is decoded once per query: the unpacked price is cached
 * in fn_extra, keyed on its stored bytes (compared every call).
 *
 * billing._rate_check() is the independent rating that verify_invoices
 * uses: no cache, the price detoasted into a fresh copy and decoded on every
 * call, the numeric path only.  It shares no state and no fast path with
 * rate(), which finalize_invoices, invoice_preview and rerate use, so that
 * one bug there cannot hide itself from the check.
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/tuplestore.h"

#include "price.h"

PG_FUNCTION_INFO_V1(billing_rate);
PG_FUNCTION_INFO_V1(billing_rate_numeric);
PG_FUNCTION_INFO_V1(billing_rate_fast);
PG_FUNCTION_INFO_V1(billing_rate_tiers);
PG_FUNCTION_INFO_V1(billing_rate_check);

/* ---------------------------------------------------------------------
 * Quantity checks and the price cache
 * ---------------------------------------------------------------------
 */

/*
 * billing_price_check_quantity
 *		Raise 22023 unless q is a finite number >= 0.  q may be packed.
 */
void
billing_price_check_quantity(Numeric q)
{
	int			dscale;
	int			kind = billing_dec_numeric_classify(q, &dscale);

	if (kind == DEC_NUM_NAN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quantity must not be NaN")));
	if (kind == DEC_NUM_PINF || kind == DEC_NUM_NINF)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quantity must be finite")));
	if (kind == DEC_NUM_NEG)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quantity must not be negative"),
				 errdetail("The quantity is %s.",
						   DatumGetCString(DirectFunctionCall1(numeric_out,
															   PointerGetDatum(pg_detoast_datum((struct varlena *) q)))))));
}

typedef struct PriceCache
{
	MemoryContext cxt;
	Size		len;
	char	   *bytes;			/* a copy of the stored bytes decoded */
	Price	   *price;
} PriceCache;

/*
 * price_from_arg
 *		The unpacked, prepared price of argument argno, decoded once and
 *		cached in fn_extra for as long as the argument's bytes stay the same
 *		(a constant: once per query).
 *
 * A hit means equal bytes, never an equal address: a per-row price (a cast,
 * a join, a detoasted value) is often built at the address where the
 * previous row's price was, with other bytes of the same length.  Stored
 * prices are canonical, so equal bytes are the same price.
 */
static Price *
price_from_arg(FunctionCallInfo fcinfo, int argno)
{
	struct varlena *v = PG_DETOAST_DATUM_PACKED(PG_GETARG_DATUM(argno));
	Size		len = VARSIZE_ANY_EXHDR(v);
	const char *data = VARDATA_ANY(v);
	PriceCache *c = (PriceCache *) fcinfo->flinfo->fn_extra;
	MemoryContext old;

	if (c != NULL && c->price != NULL && c->len == len &&
		memcmp(c->bytes, data, len) == 0)
		return c->price;
	if (c == NULL)
	{
		c = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(PriceCache));
		c->cxt = AllocSetContextCreate(fcinfo->flinfo->fn_mcxt,
									   "billing price cache",
									   ALLOCSET_SMALL_SIZES);
		fcinfo->flinfo->fn_extra = c;
	}
	else
		MemoryContextReset(c->cxt);
	/* empty until the new price is decoded (decoding may raise an error) */
	c->len = 0;
	c->bytes = NULL;
	c->price = NULL;
	old = MemoryContextSwitchTo(c->cxt);
	c->bytes = palloc(len + 1);
	memcpy(c->bytes, data, len);
	c->price = billing_price_decode(c->bytes, len);
	billing_price_prepare(c->price);
	MemoryContextSwitchTo(old);
	c->len = len;
	return c->price;
}

/* ---------------------------------------------------------------------
 * Fast path: 128-bit fixed point
 * ---------------------------------------------------------------------
 */

/*
 * per_fast
 *		Convert the quantity *Q (at scale *sq) by the per modifier of p: to
 *		the whole number ceil or floor(q / N) (scale 0), or for exact to
 *		q * (1/N) (scale *sq plus that of 1/N).  false when a value does
 *		not fit.
 */
static inline bool
per_fast(const Price *p, int128_t *Q, int *sq)
{
	if (p->flags & PRICE_PER_EXACT)
	{
		int128_t	r = *Q;
		int			rs = *sq + p->per_inv_scale;

		if (!p->per_inv_ok || !billing_dec_mul(r, p->per_inv_f, &r))
			return false;
		/* drop trailing fractional zeros the scale has no room for */
		while (rs > DEC_MAX_DIGITS && r % 10 == 0)
		{
			r /= 10;
			rs--;
		}
		if (rs > DEC_MAX_DIGITS)
			return false;
		*Q = r;
		*sq = rs;
	}
	else
	{
		int			sp = p->fast_scale;
		int			s0 = Max(*sq, sp);
		int128_t	Qs = *Q,
					N = p->per_f,
					k;
		bool		inexact;

		if (s0 > *sq && !billing_dec_mul(Qs, billing_dec_pow10[s0 - *sq], &Qs))
			return false;
		if (s0 > sp && !billing_dec_mul(N, billing_dec_pow10[s0 - sp], &N))
			return false;
		if (Qs <= PG_INT64_MAX && N <= PG_INT64_MAX)
		{
			int64		q64 = (int64) Qs,
						n64 = (int64) N;

			k = q64 / n64;
			inexact = q64 % n64 != 0;
		}
		else
		{
			k = Qs / N;
			inexact = Qs % N != 0;
		}
		if (inexact && !(p->flags & PRICE_PER_DOWN))
			k++;
		*Q = k;
		*sq = 0;
	}
	return true;
}

/*
 * billing_price_rate_fast
 *		Rate q (checked: finite, >= 0; may be packed) with the fixed-point
 *		engine.  Returns false, with nothing computed, when a value does not
 *		fit in 38 digits at the scales involved.
 */
bool
billing_price_rate_fast(const Price *p, Numeric q, Numeric *result)
{
	int			sq,
				sp,
				s,
				as;
	int128_t	Q,
				amt = 0,
				t;

	if (!p->fast_ok)
		return false;
	(void) billing_dec_numeric_classify(q, &sq);
	if (sq > DEC_MAX_DIGITS || !billing_dec_from_numeric(q, sq, &Q))
		return false;
	if ((p->flags & PRICE_HAS_PER) && !per_fast(p, &Q, &sq))
		return false;
	sp = p->fast_scale;
	s = Max(sq, sp);
	as = s + sp + (p->model == PRICE_PERCENT ? 2 : 0);
	if (as > DEC_MAX_DIGITS)
		return false;
	if (s > sq && !billing_dec_mul(Q, billing_dec_pow10[s - sq], &Q))
		return false;

/* a price quantity (at sp) at scale s */
#define AT_S(x, out) \
	do { \
		if (s == sp) (out) = (x); \
		else if (!billing_dec_mul((x), billing_dec_pow10[s - sp], &(out))) return false; \
	} while (0)
/* a price amount (at sp) at scale as */
#define AT_AS(x, out) \
	do { \
		if (!billing_dec_mul((x), billing_dec_pow10[as - sp], &(out))) return false; \
	} while (0)

	if (p->flags & PRICE_HAS_FREE)
	{
		int128_t	F;

		AT_S(p->free_f, F);
		Q = Q > F ? Q - F : 0;
	}

	switch (p->model)
	{
		case PRICE_UNIT:
			if (!billing_dec_mul(Q, p->amount_f, &amt))
				return false;
			break;
		case PRICE_PERCENT:
			/* q * R / 100: the product at scale s + sp is the result at as */
			if (!billing_dec_mul(Q, p->amount_f, &amt))
				return false;
			break;
		case PRICE_FLAT:
			AT_AS(p->amount_f, amt);
			break;
		case PRICE_PACKAGE:
			{
				int128_t	N,
							k;

				AT_S(p->size_f, N);
				if (Q <= PG_INT64_MAX && N <= PG_INT64_MAX)
				{
					int64		q64 = (int64) Q,
								n64 = (int64) N;

					k = q64 / n64;
					if (q64 % n64 != 0 && !(p->flags & PRICE_ROUND_DOWN))
						k++;
				}
				else
				{
					k = Q / N;
					if (Q % N != 0 && !(p->flags & PRICE_ROUND_DOWN))
						k++;
				}
				if (!billing_dec_mul(k, p->amount_f, &t))
					return false;
				AT_AS(t, amt);
			}
			break;
		case PRICE_GRADUATED:
			{
				int128_t	prev = 0;

				for (int i = 0; i < p->ntiers; i++)
				{
					const PriceTier *tier = &p->tiers[i];
					int128_t	b = 0,
								hi;

					if (Q <= prev)
						break;
					if (tier->inf)
						hi = Q;
					else
					{
						AT_S(tier->bound_f, b);
						hi = Q < b ? Q : b;
					}
					if (!billing_dec_mul(hi - prev, tier->unit_f, &t) ||
						!billing_dec_add(amt, t, &amt))
						return false;
					if (tier->fee_f != 0)
					{
						AT_AS(tier->fee_f, t);
						if (!billing_dec_add(amt, t, &amt))
							return false;
					}
					prev = b;
				}
			}
			break;
		case PRICE_VOLUME:
			if (Q == 0)
				break;
			for (int i = 0; i < p->ntiers; i++)
			{
				const PriceTier *tier = &p->tiers[i];
				int128_t	b;

				if (!tier->inf)
				{
					AT_S(tier->bound_f, b);
					if (Q > b)
						continue;
				}
				if (!billing_dec_mul(Q, tier->unit_f, &amt))
					return false;
				if (tier->fee_f != 0)
				{
					AT_AS(tier->fee_f, t);
					if (!billing_dec_add(amt, t, &amt))
						return false;
				}
				break;
			}
			break;
	}

	if (p->flags & PRICE_HAS_MAX)
	{
		AT_AS(p->max_f, t);
		if (amt > t)
			amt = t;
	}
	if (p->flags & PRICE_HAS_MIN)
	{
		AT_AS(p->min_f, t);
		if (amt < t)
			amt = t;
	}
#undef AT_S
#undef AT_AS

	*result = billing_dec_to_numeric(amt, as);
	return true;
}

/* ---------------------------------------------------------------------
 * Numeric path
 * ---------------------------------------------------------------------
 */

static inline Numeric
n_add(Numeric a, Numeric b)
{
	return numeric_add_opt_error(a, b, NULL);
}

static inline Numeric
n_sub(Numeric a, Numeric b)
{
	return numeric_sub_opt_error(a, b, NULL);
}

static inline Numeric
n_mul(Numeric a, Numeric b)
{
	return numeric_mul_opt_error(a, b, NULL);
}

static inline int
n_cmp(Numeric a, Numeric b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp,
											 NumericGetDatum(a),
											 NumericGetDatum(b)));
}

static inline Numeric
n_trim(Numeric a)
{
	return a == NULL ? NULL : billing_numeric_trimmed(a);
}

/* append a row to rows (when rows is not NULL) */
static void
add_row(PriceTierRow *rows, int *nrows, int tier, Numeric first,
		Numeric last, Numeric qty, Numeric unit, Numeric flat, Numeric amount)
{
	PriceTierRow *r;

	if (rows == NULL)
		return;
	r = &rows[(*nrows)++];
	r->tier = tier;
	r->first_unit = n_trim(first);
	r->last_unit = n_trim(last);
	r->quantity = n_trim(qty);
	r->unit_amount = n_trim(unit);
	r->flat_amount = n_trim(flat);
	r->amount = n_trim(amount);
}

/*
 * billing_price_rate_slow
 *		Rate q (checked, not packed) with numeric arithmetic.  When rows is
 *		not NULL it receives the rows of rate_tiers (room for ntiers + 2),
 *		whose units are those after the per conversion.
 */
Numeric
billing_price_rate_slow(const Price *p, Numeric q, PriceTierRow *rows, int *nrows)
{
	Numeric		zero = int64_to_numeric(0);
	Numeric		amt = zero;

	if (nrows)
		*nrows = 0;
	if (p->flags & PRICE_HAS_PER)
	{
		if (p->flags & PRICE_PER_EXACT)
			q = billing_numeric_trimmed(n_mul(q, p->per_inv_n));
		else
		{
			Numeric		k = DatumGetNumeric(DirectFunctionCall2(numeric_div_trunc,
																NumericGetDatum(q),
																NumericGetDatum(p->per_n)));

			if (!(p->flags & PRICE_PER_DOWN) &&
				n_cmp(numeric_mod_opt_error(q, p->per_n, NULL), zero) != 0)
				k = n_add(k, int64_to_numeric(1));
			q = k;
		}
	}
	if (p->flags & PRICE_HAS_FREE)
	{
		q = n_sub(q, p->free_n);
		if (n_cmp(q, zero) < 0)
			q = zero;
	}

	switch (p->model)
	{
		case PRICE_UNIT:
			amt = n_mul(q, p->amount_n);
			add_row(rows, nrows, 1, zero, q, q, p->amount_n, zero, amt);
			break;
		case PRICE_PERCENT:
			{
				Numeric		ur = n_mul(p->amount_n, int64_div_fast_to_numeric(1, 2));

				amt = n_mul(q, ur);
				add_row(rows, nrows, 1, zero, q, q, ur, zero, amt);
			}
			break;
		case PRICE_FLAT:
			amt = p->amount_n;
			add_row(rows, nrows, 1, zero, q, q, zero, amt, amt);
			break;
		case PRICE_PACKAGE:
			{
				Numeric		k = DatumGetNumeric(DirectFunctionCall2(numeric_div_trunc,
																	NumericGetDatum(q),
																	NumericGetDatum(p->size_n)));

				if (!(p->flags & PRICE_ROUND_DOWN) &&
					n_cmp(numeric_mod_opt_error(q, p->size_n, NULL), zero) != 0)
					k = n_add(k, int64_to_numeric(1));
				amt = n_mul(k, p->amount_n);
				add_row(rows, nrows, 1, zero, q, k, p->amount_n, zero, amt);
			}
			break;
		case PRICE_GRADUATED:
			{
				Numeric		prev = zero;

				for (int i = 0; i < p->ntiers; i++)
				{
					const PriceTier *tier = &p->tiers[i];
					Numeric		hi,
								units,
								a;

					if (n_cmp(q, prev) <= 0)
						break;
					if (tier->inf || n_cmp(q, tier->bound_n) < 0)
						hi = q;
					else
						hi = tier->bound_n;
					units = n_sub(hi, prev);
					a = n_add(n_mul(units, tier->unit_n), tier->fee_n);
					amt = n_add(amt, a);
					add_row(rows, nrows, i + 1, prev, hi, units, tier->unit_n,
							tier->fee_n, a);
					if (tier->inf)
						break;
					prev = tier->bound_n;
				}
			}
			break;
		case PRICE_VOLUME:
			if (n_cmp(q, zero) == 0)
				break;
			for (int i = 0; i < p->ntiers; i++)
			{
				const PriceTier *tier = &p->tiers[i];

				if (!tier->inf && n_cmp(q, tier->bound_n) > 0)
					continue;
				amt = n_add(n_mul(q, tier->unit_n), tier->fee_n);
				add_row(rows, nrows, i + 1, zero, q, q, tier->unit_n,
						tier->fee_n, amt);
				break;
			}
			break;
	}

	if ((p->flags & PRICE_HAS_MAX) && n_cmp(amt, p->max_n) > 0)
	{
		add_row(rows, nrows, 0, NULL, NULL, NULL, NULL, NULL,
				n_sub(p->max_n, amt));
		amt = p->max_n;
	}
	if ((p->flags & PRICE_HAS_MIN) && n_cmp(amt, p->min_n) < 0)
	{
		add_row(rows, nrows, 0, NULL, NULL, NULL, NULL, NULL,
				n_sub(p->min_n, amt));
		amt = p->min_n;
	}
	return billing_numeric_trimmed(amt);
}

/*
 * billing_price_rate_numeric
 *		The amount of price p (from billing_price_unpack) for quantity q, for C
 *		callers: raises 22023 for a negative, NaN or infinite q.
 */
Numeric
billing_price_rate_numeric(const Price *p, Numeric q)
{
	Numeric		r;

	Assert(p->prepared);
	billing_price_check_quantity(q);
	if (billing_price_rate_fast(p, q, &r))
		return r;
	return billing_price_rate_slow(p, (Numeric) pg_detoast_datum((struct varlena *) q),
								   NULL, NULL);
}

/* ---------------------------------------------------------------------
 * SQL functions
 * ---------------------------------------------------------------------
 */

/*
 * rate_args_fast
 *		Check the quantity (argument 1) and rate it with the price of
 *		argument 0 (*p) on the fixed-point path: true with the amount in
 *		*r, false when that path does not apply.
 */
static inline bool
rate_args_fast(FunctionCallInfo fcinfo, Price **p, Numeric *r)
{
	Numeric		q;

	*p = price_from_arg(fcinfo, 0);
	q = (Numeric) PG_DETOAST_DATUM_PACKED(PG_GETARG_DATUM(1));
	billing_price_check_quantity(q);
	return billing_price_rate_fast(*p, q, r);
}

/*
 * rate(p billing.price, quantity numeric) -> numeric
 */
Datum
billing_rate(PG_FUNCTION_ARGS)
{
	Price	   *p;
	Numeric		r;

	if (rate_args_fast(fcinfo, &p, &r))
		PG_RETURN_NUMERIC(r);
	PG_RETURN_NUMERIC(billing_price_rate_slow(p, PG_GETARG_NUMERIC(1), NULL, NULL));
}

/*
 * _rate_numeric(p, q) -> numeric: rate on the numeric path only (internal)
 */
Datum
billing_rate_numeric(PG_FUNCTION_ARGS)
{
	Price	   *p = price_from_arg(fcinfo, 0);
	Numeric		q = PG_GETARG_NUMERIC(1);

	billing_price_check_quantity(q);
	PG_RETURN_NUMERIC(billing_price_rate_slow(p, q, NULL, NULL));
}

/*
 * _rate_fast(p, q) -> numeric: rate on the fixed-point path only, NULL when
 * it does not apply (internal)
 */
Datum
billing_rate_fast(PG_FUNCTION_ARGS)
{
	Price	   *p;
	Numeric		r;

	if (rate_args_fast(fcinfo, &p, &r))
		PG_RETURN_NUMERIC(r);
	PG_RETURN_NULL();
}

/*
 * _rate_check(p, q) -> numeric: rate() for checkers (verify_invoices)
 *		Uncached: the price is detoasted into a fresh copy and decoded on
 *		every call, and rated on the numeric path only.  Same errors as
 *		rate() for a bad quantity.
 */
Datum
billing_rate_check(PG_FUNCTION_ARGS)
{
	struct varlena *v = PG_DETOAST_DATUM_COPY(PG_GETARG_DATUM(0));
	Numeric		q = PG_GETARG_NUMERIC(1);
	Price	   *p;

	billing_price_check_quantity(q);
	p = billing_price_decode(VARDATA(v), VARSIZE(v) - VARHDRSZ);
	billing_price_prepare(p);
	PG_RETURN_NUMERIC(billing_price_rate_slow(p, q, NULL, NULL));
}

/*
 * rate_tiers(p, q) -> TABLE (tier, first_unit, last_unit, quantity,
 *							  unit_amount, flat_amount, amount)
 *		One row per tier that received units (one row for the untiered
 *		models), then a tier-0 row for a min/max adjustment.  Materialize
 *		mode.
 */
Datum
billing_rate_tiers(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Price	   *p;
	Numeric		q;
	PriceTierRow *rows;
	int			nrows = 0;

	InitMaterializedSRF(fcinfo, 0);
	p = billing_price_unpack((struct varlena *) PG_GETARG_POINTER(0));
	q = PG_GETARG_NUMERIC(1);
	billing_price_check_quantity(q);
	rows = palloc0(sizeof(PriceTierRow) * (p->ntiers + 3));
	(void) billing_price_rate_slow(p, q, rows, &nrows);
	for (int i = 0; i < nrows; i++)
	{
		Datum		values[7];
		bool		nulls[7];
		Numeric		cols[6];

		cols[0] = rows[i].first_unit;
		cols[1] = rows[i].last_unit;
		cols[2] = rows[i].quantity;
		cols[3] = rows[i].unit_amount;
		cols[4] = rows[i].flat_amount;
		cols[5] = rows[i].amount;
		values[0] = Int32GetDatum(rows[i].tier);
		nulls[0] = false;
		for (int k = 0; k < 6; k++)
		{
			nulls[k + 1] = cols[k] == NULL;
			values[k + 1] = cols[k] ? NumericGetDatum(cols[k]) : (Datum) 0;
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
