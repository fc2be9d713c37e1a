/*
 * price_text.c
 *		The text form of billing.price (SPEC sections 1 and 10.1): the
 *		parser, which reports the position of a problem, the printer of the
 *		canonical text, and the SQL I/O functions built on them (in, out,
 *		send, recv).  Text input, binary recv and the JSON conversions all
 *		end in the same validation (billing_price_validate, price.c).
 *
 * Binary form (send/recv): a version byte followed by the canonical text,
 * version 1 for a price without per (what 1.0 sends and reads), 2 for one
 * with per (text that version 1 cannot hold).  recv reads both, and
 * refuses a per modifier under version 1.  recv accepts only printable
 * ASCII after the version byte and feeds it to the same parser and
 * validation as text input; every recv error is 22P03 (invalid binary
 * representation), with the same details as a text input error; nothing
 * is read beyond the message.
 */
#include "postgres.h"

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

static const char *const model_names[] = {
	NULL, "unit", "package", "graduated", "volume", "flat", "percent"
};

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

	while (price_is_space(*s))
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
	while (s[len] != '\0' && !price_is_space(s[len]) && len < 41)
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
				if (!price_num_is_zero(t->fee))
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
 * SQL-callable text and binary I/O
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

		if (c == 0 || c >= 0x80 || (c < 0x20 && !price_is_space((char) c)))
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
