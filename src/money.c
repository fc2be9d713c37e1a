/*
 * money.c
 *		Currencies and rounding: the ISO 4217 minor-unit exponents, and
 *		round_money(amount, currency) with the mode of GUC billing.rounding.
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/numeric.h"

#include "billing.h"
#include "money.h"

PG_FUNCTION_INFO_V1(billing_round_money_sql);
PG_FUNCTION_INFO_V1(billing_currency_exponent_sql);

typedef struct Currency
{
	char		code[4];
	int8		exponent;
} Currency;

/*
 * ISO 4217 active codes with their minor unit (list one, 2024/2025
 * amendments), sorted by code for bsearch.  Codes without a minor unit
 * ("N.A.": precious metals, XDR, XSU, XUA, testing codes) are left out.
 */
static const Currency currencies[] = {
	{"AED", 2}, {"AFN", 2}, {"ALL", 2}, {"AMD", 2}, {"ANG", 2}, {"AOA", 2},
	{"ARS", 2}, {"AUD", 2}, {"AWG", 2}, {"AZN", 2}, {"BAM", 2}, {"BBD", 2},
	{"BDT", 2}, {"BGN", 2}, {"BHD", 3}, {"BIF", 0}, {"BMD", 2}, {"BND", 2},
	{"BOB", 2}, {"BOV", 2}, {"BRL", 2}, {"BSD", 2}, {"BTN", 2}, {"BWP", 2},
	{"BYN", 2}, {"BZD", 2}, {"CAD", 2}, {"CDF", 2}, {"CHE", 2}, {"CHF", 2},
	{"CHW", 2}, {"CLF", 4}, {"CLP", 0}, {"CNY", 2}, {"COP", 2}, {"COU", 2},
	{"CRC", 2}, {"CUC", 2}, {"CUP", 2}, {"CVE", 2}, {"CZK", 2}, {"DJF", 0},
	{"DKK", 2}, {"DOP", 2}, {"DZD", 2}, {"EGP", 2}, {"ERN", 2}, {"ETB", 2},
	{"EUR", 2}, {"FJD", 2}, {"FKP", 2}, {"GBP", 2}, {"GEL", 2}, {"GHS", 2},
	{"GIP", 2}, {"GMD", 2}, {"GNF", 0}, {"GTQ", 2}, {"GYD", 2}, {"HKD", 2},
	{"HNL", 2}, {"HTG", 2}, {"HUF", 2}, {"IDR", 2}, {"ILS", 2}, {"INR", 2},
	{"IQD", 3}, {"IRR", 2}, {"ISK", 0}, {"JMD", 2}, {"JOD", 3}, {"JPY", 0},
	{"KES", 2}, {"KGS", 2}, {"KHR", 2}, {"KMF", 0}, {"KPW", 2}, {"KRW", 0},
	{"KWD", 3}, {"KYD", 2}, {"KZT", 2}, {"LAK", 2}, {"LBP", 2}, {"LKR", 2},
	{"LRD", 2}, {"LSL", 2}, {"LYD", 3}, {"MAD", 2}, {"MDL", 2}, {"MGA", 2},
	{"MKD", 2}, {"MMK", 2}, {"MNT", 2}, {"MOP", 2}, {"MRU", 2}, {"MUR", 2},
	{"MVR", 2}, {"MWK", 2}, {"MXN", 2}, {"MXV", 2}, {"MYR", 2}, {"MZN", 2},
	{"NAD", 2}, {"NGN", 2}, {"NIO", 2}, {"NOK", 2}, {"NPR", 2}, {"NZD", 2},
	{"OMR", 3}, {"PAB", 2}, {"PEN", 2}, {"PGK", 2}, {"PHP", 2}, {"PKR", 2},
	{"PLN", 2}, {"PYG", 0}, {"QAR", 2}, {"RON", 2}, {"RSD", 2}, {"RUB", 2},
	{"RWF", 0}, {"SAR", 2}, {"SBD", 2}, {"SCR", 2}, {"SDG", 2}, {"SEK", 2},
	{"SGD", 2}, {"SHP", 2}, {"SLE", 2}, {"SLL", 2}, {"SOS", 2}, {"SRD", 2},
	{"SSP", 2}, {"STN", 2}, {"SVC", 2}, {"SYP", 2}, {"SZL", 2}, {"THB", 2},
	{"TJS", 2}, {"TMT", 2}, {"TND", 3}, {"TOP", 2}, {"TRY", 2}, {"TTD", 2},
	{"TWD", 2}, {"TZS", 2}, {"UAH", 2}, {"UGX", 0}, {"USD", 2}, {"USN", 2},
	{"UYI", 0}, {"UYU", 2}, {"UYW", 4}, {"UZS", 2}, {"VED", 2}, {"VES", 2},
	{"VND", 0}, {"VUV", 0}, {"WST", 2}, {"XAF", 0}, {"XCD", 2}, {"XCG", 2},
	{"XOF", 0}, {"XPF", 0}, {"YER", 2}, {"ZAR", 2}, {"ZMW", 2}, {"ZWG", 2},
	{"ZWL", 2}
};

static int
currency_cmp(const void *a, const void *b)
{
	return strcmp(((const Currency *) a)->code, ((const Currency *) b)->code);
}

/*
 * billing_currency_exponent
 *		The ISO 4217 minor-unit exponent of a currency code (case
 *		insensitive: "usd" is USD), or -1 for an unknown code.
 */
int
billing_currency_exponent(const char *code)
{
	Currency	key;
	const Currency *found;

	if (code == NULL || strlen(code) != 3)
		return -1;
	for (int i = 0; i < 3; i++)
	{
		char		c = code[i];

		if (c >= 'a' && c <= 'z')
			c = c - 'a' + 'A';
		if (c < 'A' || c > 'Z')
			return -1;
		key.code[i] = c;
	}
	key.code[3] = '\0';
	found = bsearch(&key, currencies, lengthof(currencies), sizeof(Currency),
					currency_cmp);
	return found ? found->exponent : -1;
}

static Numeric
n_int(int64 v)
{
	return int64_to_numeric(v);
}

static int
n_cmp(Numeric a, Numeric b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a),
											 NumericGetDatum(b)));
}

/*
 * billing_round_money
 *		Round a finite amount to exponent decimal places with the mode of
 *		billing.rounding, symmetrically for negative amounts.  The result has
 *		exactly exponent decimal places.
 */
Numeric
billing_round_money(Numeric x, int exponent)
{
	Numeric		t;
	Numeric		r;
	Numeric		step;
	int			sign;

	if (numeric_is_nan(x) || numeric_is_inf(x))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cannot round a non-finite amount")));
	if (billing_rounding == BILLING_ROUND_HALF_UP)
	{
		/* numeric's round() rounds ties away from zero */
		return DatumGetNumeric(DirectFunctionCall2(numeric_round,
												   NumericGetDatum(x),
												   Int32GetDatum(exponent)));
	}
	t = DatumGetNumeric(DirectFunctionCall2(numeric_trunc, NumericGetDatum(x),
											Int32GetDatum(exponent)));
	if (billing_rounding == BILLING_ROUND_DOWN)
		return t;
	r = numeric_sub_opt_error(x, t, NULL);	/* the discarded part */
	sign = n_cmp(r, n_int(0));
	if (sign == 0)
		return t;
	/* one minor unit away from zero */
	step = int64_div_fast_to_numeric(sign, exponent);
	if (billing_rounding == BILLING_ROUND_HALF_EVEN)
	{
		Numeric		half = int64_div_fast_to_numeric(5 * sign, exponent + 1);
		int			c = n_cmp(r, half) * sign;	/* |r| against 1/2 unit */

		if (c < 0)
			return t;
		if (c == 0)
		{
			/* a tie: keep t when its last digit is even */
			static const int64 pow10[] = {1, 10, 100, 1000, 10000, 100000};
			Numeric		units = numeric_mul_opt_error(t, n_int(pow10[exponent]),
													  NULL);

			if (n_cmp(numeric_mod_opt_error(units, n_int(2), NULL), n_int(0)) == 0)
				return t;
		}
	}
	return numeric_add_opt_error(t, step, NULL);
}

/*
 * round_money(amount numeric, currency text) -> numeric
 */
Datum
billing_round_money_sql(PG_FUNCTION_ARGS)
{
	Numeric		amount = PG_GETARG_NUMERIC(0);

	PG_RETURN_NUMERIC(billing_round_money(amount,
										  billing_currency_exponent_of(PG_GETARG_TEXT_PP(1))));
}

/*
 * billing_currency_exponent_of
 *		The minor-unit exponent of a currency given as text; an unknown
 *		currency is an error (22023).  Every C caller that takes a currency
 *		from SQL checks it here.
 */
int
billing_currency_exponent_of(text *currency)
{
	char	   *code = text_to_cstring(currency);
	int			e = billing_currency_exponent(code);

	if (e < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown currency \"%s\"", code),
				 errhint("Use an ISO 4217 code with a minor unit, such as USD, EUR or JPY.")));
	return e;
}

/*
 * currency_exponent(currency text) -> int: the ISO 4217 exponent, NULL for
 * an unknown code
 */
Datum
billing_currency_exponent_sql(PG_FUNCTION_ARGS)
{
	char	   *code = text_to_cstring(PG_GETARG_TEXT_PP(0));
	int			e = billing_currency_exponent(code);

	if (e < 0)
		PG_RETURN_NULL();
	PG_RETURN_INT32(e);
}
