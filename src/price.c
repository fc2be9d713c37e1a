/*
 * price.c
 *		The billing.price type: text parser and printer (SPEC sections 1 and
 *		10.1), validation, the stored form, binary send/recv, equality and
 *		hashing.
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
 *
 * Binary form (send/recv): a version byte followed by the canonical text,
 * version 1 for a price without per (what 1.0 sends and reads), 2 for one
 * with per (text that version 1 cannot hold).  recv reads both, and
 * refuses a per modifier under version 1.  recv accepts only printable ASCII after the
 * version byte and feeds it to the same parser and validation as text
 * input; every recv error is 22P03 (invalid binary representation), with
 * the same details as a text input error; nothing is read beyond the
 * message.
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "libpq/pqformat.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"

#include "price.h"

PG_FUNCTION_INFO_V1(billing_price_in);
PG_FUNCTION_INFO_V1(billing_price_out);
PG_FUNCTION_INFO_V1(billing_price_recv);
PG_FUNCTION_INFO_V1(billing_price_send);
PG_FUNCTION_INFO_V1(billing_price_recv_bytea);
PG_FUNCTION_INFO_V1(billing_price_eq);
PG_FUNCTION_INFO_V1(billing_price_ne);
PG_FUNCTION_INFO_V1(billing_price_hash);
PG_FUNCTION_INFO_V1(billing_price_hash_extended);

/* where billing_price_validate found a problem, besides a tier index >= 0 */
#define WHERE_NONE		(-1)
#define WHERE_SIZE		(-2)
#define WHERE_MINMAX	(-3)
#define WHERE_MODEL		(-4)
#define WHERE_PER		(-5)

static const char *const model_names[] = {
	NULL, "unit", "package", "graduated", "volume", "flat", "percent"
};

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

static inline bool
num_is_zero(PriceNum n)
{
	return n.coef == 0;
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
	if (p->model == PRICE_PACKAGE && num_is_zero(p->size))
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
			if (num_is_zero(t->bound))
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

		if (num_is_zero(p->per))
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
 * Text parser
 * ---------------------------------------------------------------------
 */

typedef enum TokType
{
	TOK_END,
	TOK_WORD,
	TOK_NUMBER,
	TOK_AT,
	TOK_BAR,
	TOK_PLUS,
	TOK_MINUS,
	TOK_OTHER
} TokType;

typedef struct Token
{
	TokType		type;
	const char *start;
	int			len;
} Token;

typedef struct PriceParser
{
	const char *input;
	bool		binary;			/* the text came from recv: errors are 22P03 */
	const char *cur;
	Token		tok;			/* the current (peeked) token */
} PriceParser;

static inline bool
is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' ||
		c == '\f' || c == '\v';
}

static inline bool
is_alpha(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static inline bool
is_digit(char c)
{
	return c >= '0' && c <= '9';
}

/* read the next token at ps->cur into ps->tok (without consuming it) */
static void
lex(PriceParser *ps)
{
	const char *s = ps->cur;
	Token	   *t = &ps->tok;

	while (is_space(*s))
		s++;
	ps->cur = s;
	t->start = s;
	t->len = 1;
	if (*s == '\0')
	{
		t->type = TOK_END;
		t->len = 0;
	}
	else if (is_alpha(*s))
	{
		t->type = TOK_WORD;
		while (is_alpha(s[t->len]))
			t->len++;
	}
	else if (is_digit(*s) || *s == '.')
	{
		t->type = TOK_NUMBER;
		t->len = 0;
		while (is_digit(s[t->len]))
			t->len++;
		if (s[t->len] == '.')
		{
			t->len++;
			while (is_digit(s[t->len]))
				t->len++;
		}
	}
	else if (*s == '@')
		t->type = TOK_AT;
	else if (*s == '|')
		t->type = TOK_BAR;
	else if (*s == '+')
		t->type = TOK_PLUS;
	else if (*s == '-')
		t->type = TOK_MINUS;
	else
	{
		t->type = TOK_OTHER;
		t->len = pg_mblen(s);
	}
}

/* consume the current token and read the next one */
static void
advance(PriceParser *ps)
{
	ps->cur = ps->tok.start + ps->tok.len;
	lex(ps);
}

static bool
tok_is_word(const Token *t, const char *word)
{
	return t->type == TOK_WORD && (int) strlen(word) == t->len &&
		pg_strncasecmp(t->start, word, t->len) == 0;
}

/* "found ..." text for a token */
static char *
describe(const char *at)
{
	const char *s = at;
	int			len = 0;

	if (*s == '\0')
		return pstrdup("end of input");
	while (s[len] != '\0' && !is_space(s[len]) && len < 41)
		len++;
	if (len == 41)
	{
		len = pg_mbcliplen(s, len, 40);
		return psprintf("\"%.*s...\"", len, s);
	}
	len = pg_mbcliplen(s, len, len);
	if (len == 0)
		len = pg_mblen(s);
	return psprintf("\"%.*s\"", len, s);
}

/*
 * syntax_error
 *		Raise 22P02 (22P03 for binary input) for ps->input with a detail
 *		naming the position of at (1-based, in characters) and the message.
 */
static void
pg_attribute_noreturn()
syntax_error(PriceParser *ps, const char *at, const char *msg)
{
	int			pos = pg_mbstrlen_with_len(ps->input, at - ps->input) + 1;

	if (ps->binary)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("invalid binary input for type %s: \"%s\"",
						"price", ps->input),
				 errdetail("At position %d of the text after the version byte: %s.",
						   pos, msg)));
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
			 errmsg("invalid input syntax for type %s: \"%s\"",
					"price", ps->input),
			 errdetail("At position %d: %s.", pos, msg)));
}

/* raise "expected WHAT, found ..." at the current token */
static void
pg_attribute_noreturn()
expected(PriceParser *ps, const char *what)
{
	syntax_error(ps, ps->tok.start,
				 psprintf("expected %s, found %s", what,
						  describe(ps->tok.start)));
}

/*
 * parse_number
 *		Parse the current token as a number (what names it in messages:
 *		"a quantity", "an amount", ...) and consume it; returns its start.
 */
static const char *
parse_number(PriceParser *ps, const char *what, PriceNum *out)
{
	Token	   *t = &ps->tok;
	const char *errmsg;
	const char *start = t->start;

	if (t->type == TOK_MINUS || t->type == TOK_PLUS)
		syntax_error(ps, start,
					 psprintf("expected %s, found %s: signs are not allowed",
							  what, describe(start)));
	if (t->type == TOK_WORD)
	{
		if (tok_is_word(t, "nan"))
			syntax_error(ps, start,
						 psprintf("expected %s, found %s: NaN is not allowed",
								  what, describe(start)));
		if (tok_is_word(t, "inf") || tok_is_word(t, "infinity"))
			syntax_error(ps, start,
						 psprintf("expected %s, found %s: infinity is only allowed as the bound of the last tier",
								  what, describe(start)));
	}
	if (t->type != TOK_NUMBER)
		expected(ps, what);
	if (t->start[t->len] == 'e' || t->start[t->len] == 'E')
		syntax_error(ps, start,
					 psprintf("expected %s, found %s: exponents are not allowed",
							  what, describe(start)));
	if (!billing_price_num_parse(t->start, t->len, out, &errmsg))
		syntax_error(ps, start,
					 psprintf("expected %s, found %s: %s",
							  what, describe(start), errmsg));
	advance(ps);
	return start;
}

/* expect and consume "@" */
static void
expect_at(PriceParser *ps)
{
	if (ps->tok.type != TOK_AT)
		expected(ps, "\"@\"");
	advance(ps);
}

/*
 * billing_price_parse_cstring
 *		Parse and validate the text form of a price; raises 22P02 with the
 *		position of the problem.  (binary: the text came from recv; the
 *		error is 22P03 instead.)
 */
Price *
billing_price_parse_cstring(const char *str, bool binary)
{
	PriceParser ps;
	Price	   *p = palloc0(sizeof(Price));
	const char *pos_size = NULL;
	const char *pos_min = NULL;
	const char *pos_max = NULL;
	const char *pos_per = NULL;
	const char **pos_tier = NULL;
	const char *model_start;
	const char *after_model;	/* where the modifiers start */
	const char *after_per = NULL;	/* right after "per N" */
	const char *msg;
	int			where;
	int			maxtiers = 0;

	ps.input = str;
	ps.binary = binary;
	ps.cur = str;
	lex(&ps);

	/* model */
	model_start = ps.tok.start;
	if (tok_is_word(&ps.tok, "unit"))
		p->model = PRICE_UNIT;
	else if (tok_is_word(&ps.tok, "package"))
		p->model = PRICE_PACKAGE;
	else if (tok_is_word(&ps.tok, "graduated"))
		p->model = PRICE_GRADUATED;
	else if (tok_is_word(&ps.tok, "volume"))
		p->model = PRICE_VOLUME;
	else if (tok_is_word(&ps.tok, "flat"))
		p->model = PRICE_FLAT;
	else if (tok_is_word(&ps.tok, "percent"))
		p->model = PRICE_PERCENT;
	else
		expected(&ps, "a model (unit, package, graduated, volume, flat or percent)");
	advance(&ps);

	switch (p->model)
	{
		case PRICE_UNIT:
		case PRICE_FLAT:
			parse_number(&ps, "an amount", &p->amount);
			break;
		case PRICE_PERCENT:
			parse_number(&ps, "a rate", &p->amount);
			break;
		case PRICE_PACKAGE:
			pos_size = parse_number(&ps, "a package size", &p->size);
			expect_at(&ps);
			parse_number(&ps, "an amount", &p->amount);
			if (tok_is_word(&ps.tok, "round"))
			{
				advance(&ps);
				if (tok_is_word(&ps.tok, "down"))
					p->flags |= PRICE_ROUND_DOWN;
				else if (!tok_is_word(&ps.tok, "up"))
					expected(&ps, "\"up\" or \"down\" after \"round\"");
				advance(&ps);
			}
			break;
		case PRICE_GRADUATED:
		case PRICE_VOLUME:
			for (;;)
			{
				PriceTier  *t;

				if (p->ntiers == maxtiers)
				{
					maxtiers = maxtiers ? maxtiers * 2 : 4;
					if (p->tiers == NULL)
					{
						p->tiers = palloc0(sizeof(PriceTier) * maxtiers);
						pos_tier = palloc0(sizeof(char *) * maxtiers);
					}
					else
					{
						p->tiers = repalloc(p->tiers, sizeof(PriceTier) * maxtiers);
						pos_tier = repalloc(pos_tier, sizeof(char *) * maxtiers);
					}
				}
				t = &p->tiers[p->ntiers];
				memset(t, 0, sizeof(PriceTier));
				pos_tier[p->ntiers] = ps.tok.start;
				if (tok_is_word(&ps.tok, "inf"))
				{
					t->inf = true;
					advance(&ps);
				}
				else
					parse_number(&ps, "a tier bound (a quantity or inf)", &t->bound);
				expect_at(&ps);
				parse_number(&ps, "an amount", &t->unit);
				if (ps.tok.type == TOK_PLUS)
				{
					advance(&ps);
					parse_number(&ps, "a flat fee (an amount)", &t->fee);
				}
				p->ntiers++;
				if (ps.tok.type != TOK_BAR)
					break;
				advance(&ps);
			}
			break;
	}
	after_model = ps.tok.start;

	/* modifiers */
	while (ps.tok.type != TOK_END)
	{
		const char *start = ps.tok.start;
		int			flag;
		PriceNum   *target;

		if (tok_is_word(&ps.tok, "free"))
			flag = PRICE_HAS_FREE, target = &p->free;
		else if (tok_is_word(&ps.tok, "min"))
			flag = PRICE_HAS_MIN, target = &p->min, pos_min = start;
		else if (tok_is_word(&ps.tok, "max"))
			flag = PRICE_HAS_MAX, target = &p->max, pos_max = start;
		else if (tok_is_word(&ps.tok, "per"))
			flag = PRICE_HAS_PER, target = &p->per, pos_per = start;
		else
		{
			/* what else could have come right here */
			const char *also = "";

			if (p->model == PRICE_PACKAGE && ps.tok.start == after_model)
				also = "\"round\", ";
			else if ((p->model == PRICE_GRADUATED || p->model == PRICE_VOLUME) &&
					 ps.tok.start == after_model)
				also = "\"|\", ";
			else if (ps.tok.start == after_per)
				also = "\"round\", \"exact\", ";
			expected(&ps, psprintf("%s\"free\", \"min\", \"max\", \"per\" or end of input",
								   also));
		}
		if (p->flags & flag)
			syntax_error(&ps, start,
						 psprintf("\"%.*s\" is given twice",
								  ps.tok.len, ps.tok.start));
		p->flags |= flag;
		advance(&ps);
		parse_number(&ps, flag == PRICE_HAS_FREE || flag == PRICE_HAS_PER ?
					 "a quantity" : "an amount",
					 target);
		if (flag == PRICE_HAS_PER)
		{
			/* per N [round up | round down | exact] */
			if (tok_is_word(&ps.tok, "round"))
			{
				advance(&ps);
				if (tok_is_word(&ps.tok, "down"))
					p->flags |= PRICE_PER_DOWN;
				else if (!tok_is_word(&ps.tok, "up"))
					expected(&ps, "\"up\" or \"down\" after \"round\"");
				advance(&ps);
			}
			else if (tok_is_word(&ps.tok, "exact"))
			{
				p->flags |= PRICE_PER_EXACT;
				advance(&ps);
			}
			else
				after_per = ps.tok.start;
		}
	}

	msg = billing_price_validate(p, &where);
	if (msg != NULL)
	{
		const char *at = model_start;

		if (where >= 0)
			at = pos_tier[where];
		else if (where == WHERE_SIZE)
			at = pos_size;
		else if (where == WHERE_MINMAX)
			at = pos_min > pos_max ? pos_min : pos_max;
		else if (where == WHERE_PER)
			at = pos_per;
		syntax_error(&ps, at, msg);
	}
	return p;
}

/* ---------------------------------------------------------------------
 * Printer
 * ---------------------------------------------------------------------
 */

static void
append_num(StringInfo buf, PriceNum n)
{
	char		tmp[DEC_CSTRING_LEN];

	billing_dec_to_cstring(n.coef, n.scale, tmp);
	appendStringInfoString(buf, tmp);
}

/*
 * billing_price_to_cstring
 *		The canonical text of a price.
 */
char *
billing_price_to_cstring(const Price *p)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, model_names[p->model]);
	appendStringInfoChar(&buf, ' ');
	switch (p->model)
	{
		case PRICE_UNIT:
		case PRICE_FLAT:
		case PRICE_PERCENT:
			append_num(&buf, p->amount);
			break;
		case PRICE_PACKAGE:
			append_num(&buf, p->size);
			appendStringInfoString(&buf, " @ ");
			append_num(&buf, p->amount);
			if (p->flags & PRICE_ROUND_DOWN)
				appendStringInfoString(&buf, " round down");
			break;
		case PRICE_GRADUATED:
		case PRICE_VOLUME:
			for (int i = 0; i < p->ntiers; i++)
			{
				const PriceTier *t = &p->tiers[i];

				if (i > 0)
					appendStringInfoString(&buf, " | ");
				if (t->inf)
					appendStringInfoString(&buf, "inf");
				else
					append_num(&buf, t->bound);
				appendStringInfoString(&buf, " @ ");
				append_num(&buf, t->unit);
				if (!num_is_zero(t->fee))
				{
					appendStringInfoString(&buf, " + ");
					append_num(&buf, t->fee);
				}
			}
			break;
	}
	if (p->flags & PRICE_HAS_FREE)
	{
		appendStringInfoString(&buf, " free ");
		append_num(&buf, p->free);
	}
	if (p->flags & PRICE_HAS_MIN)
	{
		appendStringInfoString(&buf, " min ");
		append_num(&buf, p->min);
	}
	if (p->flags & PRICE_HAS_MAX)
	{
		appendStringInfoString(&buf, " max ");
		append_num(&buf, p->max);
	}
	if (p->flags & PRICE_HAS_PER)
	{
		appendStringInfoString(&buf, " per ");
		append_num(&buf, p->per);
		if (p->flags & PRICE_PER_DOWN)
			appendStringInfoString(&buf, " round down");
		else if (p->flags & PRICE_PER_EXACT)
			appendStringInfoString(&buf, " exact");
	}
	return buf.data;
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
 * SQL-callable I/O, equality and hashing
 * ---------------------------------------------------------------------
 */

/*
 * price_in(cstring) -> billing.price
 */
Datum
billing_price_in(PG_FUNCTION_ARGS)
{
	char	   *str = PG_GETARG_CSTRING(0);

	PG_RETURN_POINTER(billing_price_encode(billing_price_parse_cstring(str, false)));
}

/*
 * price_out(billing.price) -> cstring: the canonical text
 */
Datum
billing_price_out(PG_FUNCTION_ARGS)
{
	struct varlena *v = PG_DETOAST_DATUM_PACKED(PG_GETARG_DATUM(0));
	Price	   *p = billing_price_decode(VARDATA_ANY(v), VARSIZE_ANY_EXHDR(v));

	PG_RETURN_CSTRING(billing_price_to_cstring(p));
}

/*
 * price_recv_common
 *		Read a binary price from buf: the version byte (1, or 2 when the
 *		price may have a per modifier), then the text, which must be
 *		printable ASCII and is validated like text input.  Consumes the
 *		whole message.  Every error is 22P03.
 */
static struct varlena *
price_recv_common(StringInfo buf)
{
	int			version;
	int			len;
	const char *s;
	char	   *str;
	Price	   *p;

	if (buf->cursor >= buf->len)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("invalid binary input for type price"),
				 errdetail("The value is empty; it must start with the format version byte.")));
	version = (unsigned char) buf->data[buf->cursor++];
	if (version != PRICE_FORMAT_VERSION && version != PRICE_FORMAT_VERSION_PER)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("invalid binary input for type price"),
				 errdetail("Unsupported format version %d; expected %d or %d.",
						   version, PRICE_FORMAT_VERSION,
						   PRICE_FORMAT_VERSION_PER)));
	len = buf->len - buf->cursor;
	s = buf->data + buf->cursor;
	for (int i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c == 0 || c >= 0x80 || (c < 0x20 && !is_space((char) c)))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
					 errmsg("invalid binary input for type price"),
					 errdetail("Byte %d (0x%02x) is not printable ASCII.",
							   i + 2, c)));
	}
	str = pnstrdup(s, len);
	buf->cursor = buf->len;
	p = billing_price_parse_cstring(str, true);
	if (version == PRICE_FORMAT_VERSION && (p->flags & PRICE_HAS_PER))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("invalid binary input for type price: \"%s\"", str),
				 errdetail("Format version %d has no \"per\" modifier; a price with one is sent as version %d.",
						   PRICE_FORMAT_VERSION, PRICE_FORMAT_VERSION_PER)));
	return billing_price_encode(p);
}

/*
 * price_recv(internal) -> billing.price
 */
Datum
billing_price_recv(PG_FUNCTION_ARGS)
{
	StringInfo	buf = (StringInfo) PG_GETARG_POINTER(0);

	PG_RETURN_POINTER(price_recv_common(buf));
}

/*
 * _price_recv(bytea) -> billing.price: price_recv on the bytes of a bytea,
 * for tests of the binary input.
 */
Datum
billing_price_recv_bytea(PG_FUNCTION_ARGS)
{
	bytea	   *b = PG_GETARG_BYTEA_PP(0);
	StringInfoData buf;

	buf.len = VARSIZE_ANY_EXHDR(b);
	buf.maxlen = buf.len + 1;
	buf.data = palloc(buf.maxlen);
	memcpy(buf.data, VARDATA_ANY(b), buf.len);
	buf.data[buf.len] = '\0';
	buf.cursor = 0;
	PG_RETURN_POINTER(price_recv_common(&buf));
}

/*
 * price_send(billing.price) -> bytea: version byte (1, or 2 for a price
 * with a per modifier), then the canonical text
 */
Datum
billing_price_send(PG_FUNCTION_ARGS)
{
	struct varlena *v = PG_DETOAST_DATUM_PACKED(PG_GETARG_DATUM(0));
	Price	   *p = billing_price_decode(VARDATA_ANY(v), VARSIZE_ANY_EXHDR(v));
	char	   *text = billing_price_to_cstring(p);
	StringInfoData buf;

	pq_begintypsend(&buf);
	pq_sendbyte(&buf, (p->flags & PRICE_HAS_PER) ? PRICE_FORMAT_VERSION_PER :
				PRICE_FORMAT_VERSION);
	pq_sendbytes(&buf, text, strlen(text));
	PG_RETURN_BYTEA_P(pq_endtypsend(&buf));
}

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
