/*
 * price_json.c
 *		Prices as JSON: price_to_jsonb / price_from_jsonb (exact inverses,
 *		numbers as JSON strings) and price_from_stripe (a Stripe Price
 *		object, amounts converted from minor to major units).
 *
 * JSON shape (keys in jsonb order; numbers are strings, so never rounded):
 *
 *	{"model": "unit",      "unit_amount": "0.5"}
 *	{"model": "package",   "package_size": "100", "amount": "5", "round": "up"}
 *	{"model": "graduated", "tiers": [{"up_to": "5000", "unit_amount": "0",
 *									  "flat_amount": "0"}, ...,
 *									 {"up_to": "inf", ...}]}
 *	{"model": "volume",    "tiers": [...]}
 *	{"model": "flat",      "amount": "10"}
 *	{"model": "percent",   "percent": "2.9"}
 *
 * plus "free", "min", "max" when the price has them, and for a per modifier
 * "per": "1000", "per_round": "up" | "down" | "exact".  price_from_jsonb
 * also accepts JSON numbers for every number (jsonb keeps them exact) and
 * treats a missing "round" or "per_round" as "up" and a missing
 * "flat_amount" as 0; any other missing or unknown key is an error (22P02).
 */
#include "postgres.h"

#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "money.h"
#include "price.h"

PG_FUNCTION_INFO_V1(billing_price_to_jsonb);
PG_FUNCTION_INFO_V1(billing_price_from_jsonb);
PG_FUNCTION_INFO_V1(billing_price_from_stripe);

/* how errors of one conversion are reported */
typedef struct JsonCtx
{
	int			sqlstate;
	const char *errmsg;
} JsonCtx;

/* raise the error of ctx with a detail sentence built from fmt */
static void
pg_attribute_noreturn()
pg_attribute_printf(2, 3)
jerror(const JsonCtx *ctx, const char *fmt,...)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (;;)
	{
		va_list		args;
		int			needed;

		va_start(args, fmt);
		needed = appendStringInfoVA(&buf, fmt, args);
		va_end(args);
		if (needed == 0)
			break;
		enlargeStringInfo(&buf, needed);
	}
	ereport(ERROR,
			(errcode(ctx->sqlstate),
			 errmsg("%s", ctx->errmsg),
			 errdetail("%s", buf.data)));
}

/* ---------------------------------------------------------------------
 * price_to_jsonb
 * ---------------------------------------------------------------------
 */

static void
json_num(StringInfo buf, const char *key, PriceNum n)
{
	char		tmp[DEC_CSTRING_LEN];

	billing_dec_to_cstring(n.coef, n.scale, tmp);
	appendStringInfo(buf, ", \"%s\": \"%s\"", key, tmp);
}

/*
 * price_to_jsonb(p billing.price) -> jsonb
 */
Datum
billing_price_to_jsonb(PG_FUNCTION_ARGS)
{
	struct varlena *v = PG_DETOAST_DATUM_PACKED(PG_GETARG_DATUM(0));
	Price	   *p = billing_price_decode(VARDATA_ANY(v), VARSIZE_ANY_EXHDR(v));
	StringInfoData buf;
	static const char *const names[] = {
		NULL, "unit", "package", "graduated", "volume", "flat", "percent"
	};

	initStringInfo(&buf);
	appendStringInfo(&buf, "{\"model\": \"%s\"", names[p->model]);
	switch (p->model)
	{
		case PRICE_UNIT:
			json_num(&buf, "unit_amount", p->amount);
			break;
		case PRICE_FLAT:
			json_num(&buf, "amount", p->amount);
			break;
		case PRICE_PERCENT:
			json_num(&buf, "percent", p->amount);
			break;
		case PRICE_PACKAGE:
			json_num(&buf, "package_size", p->size);
			json_num(&buf, "amount", p->amount);
			appendStringInfo(&buf, ", \"round\": \"%s\"",
							 (p->flags & PRICE_ROUND_DOWN) ? "down" : "up");
			break;
		case PRICE_GRADUATED:
		case PRICE_VOLUME:
			appendStringInfoString(&buf, ", \"tiers\": [");
			for (int i = 0; i < p->ntiers; i++)
			{
				const PriceTier *t = &p->tiers[i];

				appendStringInfoString(&buf, i ? ", {" : "{");
				if (t->inf)
					appendStringInfoString(&buf, "\"up_to\": \"inf\"");
				else
				{
					char		tmp[DEC_CSTRING_LEN];

					billing_dec_to_cstring(t->bound.coef, t->bound.scale, tmp);
					appendStringInfo(&buf, "\"up_to\": \"%s\"", tmp);
				}
				json_num(&buf, "unit_amount", t->unit);
				json_num(&buf, "flat_amount", t->fee);
				appendStringInfoChar(&buf, '}');
			}
			appendStringInfoChar(&buf, ']');
			break;
	}
	if (p->flags & PRICE_HAS_FREE)
		json_num(&buf, "free", p->free);
	if (p->flags & PRICE_HAS_MIN)
		json_num(&buf, "min", p->min);
	if (p->flags & PRICE_HAS_MAX)
		json_num(&buf, "max", p->max);
	if (p->flags & PRICE_HAS_PER)
	{
		json_num(&buf, "per", p->per);
		appendStringInfo(&buf, ", \"per_round\": \"%s\"",
						 (p->flags & PRICE_PER_DOWN) ? "down" :
						 (p->flags & PRICE_PER_EXACT) ? "exact" : "up");
	}
	appendStringInfoChar(&buf, '}');
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}

/* ---------------------------------------------------------------------
 * Reading JSON
 * ---------------------------------------------------------------------
 */

/* the value of key in object c, or NULL when absent or JSON null */
static JsonbValue *
jget(JsonbContainer *c, const char *key)
{
	JsonbValue *v = getKeyJsonValueFromContainer(c, key, strlen(key), NULL);

	if (v == NULL || v->type == jbvNull)
		return NULL;
	return v;
}

/* the container of an object value, or an error naming what */
static JsonbContainer *
jobject(const JsonCtx *ctx, JsonbValue *v, const char *what)
{
	if (v == NULL || v->type != jbvBinary ||
		!JsonContainerIsObject(v->val.binary.data))
		jerror(ctx, "%s must be a JSON object.", what);
	return v->val.binary.data;
}

/* the text of a string value as a C string, or an error */
static char *
jstring(const JsonCtx *ctx, JsonbValue *v, const char *what)
{
	if (v == NULL || v->type != jbvString)
		jerror(ctx, "%s must be a JSON string.", what);
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/*
 * jnumber_text
 *		The decimal text of a number given as a JSON string or number;
 *		NULL when v is neither.
 */
static char *
jnumber_text(JsonbValue *v)
{
	if (v->type == jbvString)
		return pnstrdup(v->val.string.val, v->val.string.len);
	if (v->type == jbvNumeric)
		return DatumGetCString(DirectFunctionCall1(numeric_out,
												   NumericGetDatum(v->val.numeric)));
	return NULL;
}

/* read a number (string or number) into *out, or an error naming what */
static void
jnumber(const JsonCtx *ctx, JsonbValue *v, const char *what, PriceNum *out)
{
	char	   *s;
	const char *msg;

	if (v == NULL)
		jerror(ctx, "%s is missing.", what);
	s = jnumber_text(v);
	if (s == NULL)
		jerror(ctx, "%s must be a decimal number given as a JSON string or number.", what);
	if (!billing_price_num_parse(s, strlen(s), out, &msg))
	{
		if (s[0] == '-')
			msg = "negative numbers are not allowed";
		jerror(ctx, "%s is \"%s\": %s.", what, s, msg);
	}
}

/* raise the error of ctx when object c has a key not in allowed */
static void
jcheck_keys(const JsonCtx *ctx, JsonbContainer *c, const char *const *allowed,
			const char *what)
{
	JsonbIterator *it = JsonbIteratorInit(c);
	JsonbValue	v;
	JsonbIteratorToken r;

	while ((r = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		bool		ok = false;

		if (r != WJB_KEY)
			continue;
		for (int i = 0; allowed[i] != NULL; i++)
			if ((int) strlen(allowed[i]) == v.val.string.len &&
				memcmp(allowed[i], v.val.string.val, v.val.string.len) == 0)
				ok = true;
		if (!ok)
			jerror(ctx, "Unknown key \"%.*s\" in %s.",
				   v.val.string.len, v.val.string.val, what);
	}
}

/* validate p and raise the error of ctx when it breaks a rule */
static void
jvalidate(const JsonCtx *ctx, const Price *p)
{
	int			where;
	const char *msg = billing_price_validate(p, &where);

	if (msg == NULL)
		return;
	if (where >= 0)
		jerror(ctx, "In tier %d: %s.", where + 1, msg);
	jerror(ctx, "%c%s.", pg_toupper((unsigned char) msg[0]), msg + 1);
}

/* read the modifiers free/min/max/per (and per_round) of object c into p */
static void
jmodifiers(const JsonCtx *ctx, JsonbContainer *c, Price *p)
{
	JsonbValue *v;

	if ((v = jget(c, "free")) != NULL)
	{
		jnumber(ctx, v, "\"free\"", &p->free);
		p->flags |= PRICE_HAS_FREE;
	}
	if ((v = jget(c, "min")) != NULL)
	{
		jnumber(ctx, v, "\"min\"", &p->min);
		p->flags |= PRICE_HAS_MIN;
	}
	if ((v = jget(c, "max")) != NULL)
	{
		jnumber(ctx, v, "\"max\"", &p->max);
		p->flags |= PRICE_HAS_MAX;
	}
	if ((v = jget(c, "per")) != NULL)
	{
		jnumber(ctx, v, "\"per\"", &p->per);
		p->flags |= PRICE_HAS_PER;
	}
	if ((v = jget(c, "per_round")) != NULL)
	{
		char	   *r = jstring(ctx, v, "\"per_round\"");

		if (!(p->flags & PRICE_HAS_PER))
			jerror(ctx, "\"per_round\" is given without \"per\".");
		if (strcmp(r, "down") == 0)
			p->flags |= PRICE_PER_DOWN;
		else if (strcmp(r, "exact") == 0)
			p->flags |= PRICE_PER_EXACT;
		else if (strcmp(r, "up") != 0)
			jerror(ctx, "\"per_round\" must be \"up\", \"down\" or \"exact\", not \"%s\".", r);
	}
}

/* the object at the top of j, or an error */
static JsonbContainer *
jroot(const JsonCtx *ctx, Jsonb *j)
{
	JsonbContainer *c = &j->root;

	if (!JsonContainerIsObject(c) || JsonContainerIsScalar(c))
		jerror(ctx, "The value must be a JSON object.");
	return c;
}

/*
 * jround
 *		Read a rounding from v, when there is one: "up" (the default) or
 *		"down", which sets flag down in p (the "round" of a package price,
 *		or of Stripe's transform_quantity); what names it in errors.
 */
static void
jround(const JsonCtx *ctx, JsonbValue *v, const char *what, int down, Price *p)
{
	char	   *r;

	if (v == NULL)
		return;
	r = jstring(ctx, v, what);
	if (strcmp(r, "down") == 0)
		p->flags |= down;
	else if (strcmp(r, "up") != 0)
		jerror(ctx, "%s must be \"up\" or \"down\", not \"%s\".", what, r);
}

/*
 * jtiers
 *		The array under key "tiers" of c, non-empty (notarray: the detail
 *		when it is missing or not an array), with p's tiers allocated for it.
 */
static JsonbContainer *
jtiers(const JsonCtx *ctx, JsonbContainer *c, const char *notarray, Price *p)
{
	JsonbValue *v = jget(c, "tiers");
	JsonbContainer *tc;

	if (v == NULL || v->type != jbvBinary || !JsonContainerIsArray(v->val.binary.data))
		jerror(ctx, "%s", notarray);
	tc = v->val.binary.data;
	p->ntiers = JsonContainerSize(tc);
	if (p->ntiers < 1)
		jerror(ctx, "\"tiers\" must not be empty.");
	p->tiers = palloc0(sizeof(PriceTier) * p->ntiers);
	return tc;
}

/* is v the string "inf" (the open upper bound of a last tier)? */
static bool
jis_inf(JsonbValue *v)
{
	return v->type == jbvString && v->val.string.len == 3 &&
		memcmp(v->val.string.val, "inf", 3) == 0;
}

/* ---------------------------------------------------------------------
 * price_from_jsonb
 * ---------------------------------------------------------------------
 */

/*
 * price_from_jsonb(j jsonb) -> billing.price: the inverse of price_to_jsonb
 */
Datum
billing_price_from_jsonb(PG_FUNCTION_ARGS)
{
	JsonCtx		ctx = {ERRCODE_INVALID_TEXT_REPRESENTATION,
	"invalid JSON representation of a billing.price"};
	JsonbContainer *c = jroot(&ctx, PG_GETARG_JSONB_P(0));
	Price	   *p = palloc0(sizeof(Price));
	char	   *model;
	JsonbValue *v;

	v = jget(c, "model");
	if (v == NULL)
		jerror(&ctx, "Key \"model\" is missing.");
	model = jstring(&ctx, v, "\"model\"");
	if (strcmp(model, "unit") == 0)
	{
		static const char *const keys[] = {"model", "unit_amount", "free", "min", "max", "per", "per_round", NULL};

		jcheck_keys(&ctx, c, keys, "a unit price");
		p->model = PRICE_UNIT;
		jnumber(&ctx, jget(c, "unit_amount"), "\"unit_amount\"", &p->amount);
	}
	else if (strcmp(model, "flat") == 0)
	{
		static const char *const keys[] = {"model", "amount", "free", "min", "max", "per", "per_round", NULL};

		jcheck_keys(&ctx, c, keys, "a flat price");
		p->model = PRICE_FLAT;
		jnumber(&ctx, jget(c, "amount"), "\"amount\"", &p->amount);
	}
	else if (strcmp(model, "percent") == 0)
	{
		static const char *const keys[] = {"model", "percent", "free", "min", "max", "per", "per_round", NULL};

		jcheck_keys(&ctx, c, keys, "a percent price");
		p->model = PRICE_PERCENT;
		jnumber(&ctx, jget(c, "percent"), "\"percent\"", &p->amount);
	}
	else if (strcmp(model, "package") == 0)
	{
		static const char *const keys[] = {"model", "package_size", "amount", "round", "free", "min", "max", "per", "per_round", NULL};

		jcheck_keys(&ctx, c, keys, "a package price");
		p->model = PRICE_PACKAGE;
		jnumber(&ctx, jget(c, "package_size"), "\"package_size\"", &p->size);
		jnumber(&ctx, jget(c, "amount"), "\"amount\"", &p->amount);
		jround(&ctx, jget(c, "round"), "\"round\"", PRICE_ROUND_DOWN, p);
	}
	else if (strcmp(model, "graduated") == 0 || strcmp(model, "volume") == 0)
	{
		static const char *const keys[] = {"model", "tiers", "free", "min", "max", "per", "per_round", NULL};
		static const char *const tkeys[] = {"up_to", "unit_amount", "flat_amount", NULL};
		JsonbContainer *tc;

		jcheck_keys(&ctx, c, keys, "a tiered price");
		p->model = model[0] == 'g' ? PRICE_GRADUATED : PRICE_VOLUME;
		tc = jtiers(&ctx, c, "\"tiers\" must be a JSON array of tiers.", p);
		for (int i = 0; i < p->ntiers; i++)
		{
			JsonbValue *tv = getIthJsonbValueFromContainer(tc, i);
			JsonbContainer *t;
			char		what[64];

			snprintf(what, sizeof(what), "tier %d", i + 1);
			t = jobject(&ctx, tv, what);
			jcheck_keys(&ctx, t, tkeys, what);
			v = jget(t, "up_to");
			if (v == NULL)
				jerror(&ctx, "\"up_to\" of tier %d is missing.", i + 1);
			if (jis_inf(v))
				p->tiers[i].inf = true;
			else
			{
				snprintf(what, sizeof(what), "\"up_to\" of tier %d", i + 1);
				jnumber(&ctx, v, what, &p->tiers[i].bound);
			}
			snprintf(what, sizeof(what), "\"unit_amount\" of tier %d", i + 1);
			jnumber(&ctx, jget(t, "unit_amount"), what, &p->tiers[i].unit);
			if ((v = jget(t, "flat_amount")) != NULL)
			{
				snprintf(what, sizeof(what), "\"flat_amount\" of tier %d", i + 1);
				jnumber(&ctx, v, what, &p->tiers[i].fee);
			}
		}
	}
	else
		jerror(&ctx, "Unknown model \"%s\"; expected unit, package, graduated, volume, flat or percent.", model);

	jmodifiers(&ctx, c, p);
	jvalidate(&ctx, p);
	PG_RETURN_POINTER(billing_price_encode(p));
}

/* ---------------------------------------------------------------------
 * price_from_stripe
 * ---------------------------------------------------------------------
 */

/*
 * stripe_amount
 *		An amount of a Stripe object in major units: the "NAME_decimal"
 *		string (minor units, decimals allowed) if present, else the integer
 *		NAME (minor units), else *present = false.  Divides by 10^exponent.
 */
static void
stripe_amount(const JsonCtx *ctx, JsonbContainer *c, const char *name,
			  int exponent, const char *where, PriceNum *out, bool *present)
{
	char		key[64];
	char		what[128];
	JsonbValue *v;
	PriceNum	n;

	snprintf(key, sizeof(key), "%s_decimal", name);
	*present = true;
	if ((v = jget(c, key)) != NULL)
	{
		snprintf(what, sizeof(what), "\"%s\"%s", key, where);
		if (v->type != jbvString && v->type != jbvNumeric)
			jerror(ctx, "%s must be a decimal string.", what);
		jnumber(ctx, v, what, &n);
	}
	else if ((v = jget(c, name)) != NULL)
	{
		snprintf(what, sizeof(what), "\"%s\"%s", name, where);
		if (v->type != jbvNumeric)
			jerror(ctx, "%s must be an integer.", what);
		jnumber(ctx, v, what, &n);
		if (n.scale != 0)
			jerror(ctx, "%s must be an integer (minor units), not %s.",
				   what, billing_price_num_to_cstring(n));
	}
	else
	{
		*present = false;
		out->coef = 0;
		out->scale = 0;
		return;
	}
	/* minor to major units: divide by 10^exponent, exactly */
	if (n.coef != 0)
	{
		n.scale += exponent;
		while (n.scale > 0 && n.coef % 10 == 0)
		{
			n.coef /= 10;
			n.scale--;
		}
		if (n.scale > PRICE_MAX_SCALE)
			jerror(ctx, "\"%s\"%s has more than 20 digits after the decimal point in major units.",
				   name, where);
	}
	*out = n;
}

/*
 * stripe_transform
 *		Stripe's "transform_quantity" {divide_by, round} of object c, if
 *		any, as the per modifier of p: divide_by must be a positive integer,
 *		round "up" (the default) or "down".
 */
static void
stripe_transform(const JsonCtx *ctx, JsonbContainer *c, Price *p)
{
	JsonbValue *v;
	JsonbContainer *t;

	if ((v = jget(c, "transform_quantity")) == NULL)
		return;
	t = jobject(ctx, v, "\"transform_quantity\"");
	jnumber(ctx, jget(t, "divide_by"), "\"divide_by\" of \"transform_quantity\"", &p->per);
	if (p->per.scale != 0 || p->per.coef == 0)
		jerror(ctx, "\"divide_by\" of \"transform_quantity\" must be a positive integer.");
	p->flags |= PRICE_HAS_PER;
	jround(ctx, jget(t, "round"), "\"round\" of \"transform_quantity\"", PRICE_PER_DOWN, p);
}

/*
 * price_from_stripe(stripe_price jsonb) -> billing.price
 *		A Stripe Price object: billing_scheme per_unit or tiered (tiers_mode
 *		graduated or volume), either with an optional transform_quantity,
 *		which becomes a per modifier (1.0 made a per_unit one a package
 *		price, which rates the same).  Amounts are in the currency's minor
 *		units; the price holds major units.  Unknown keys are ignored (Stripe
 *		objects carry many); errors are 22023.
 */
Datum
billing_price_from_stripe(PG_FUNCTION_ARGS)
{
	JsonCtx		ctx = {ERRCODE_INVALID_PARAMETER_VALUE,
	"invalid Stripe price object"};
	JsonbContainer *c = jroot(&ctx, PG_GETARG_JSONB_P(0));
	char	   *scheme = "per_unit";
	char	   *currency;
	int			exponent;
	bool		present;
	JsonbValue *v;
	Price	   *p = palloc0(sizeof(Price));

	if ((v = jget(c, "object")) != NULL)
	{
		char	   *obj = jstring(&ctx, v, "\"object\"");

		if (strcmp(obj, "price") != 0)
			jerror(&ctx, "\"object\" is \"%s\", not \"price\".", obj);
	}
	if ((v = jget(c, "currency")) == NULL)
		jerror(&ctx, "\"currency\" is missing.");
	currency = jstring(&ctx, v, "\"currency\"");
	exponent = billing_currency_exponent(currency);
	if (exponent < 0)
		jerror(&ctx, "Unknown currency \"%s\".", currency);
	if ((v = jget(c, "custom_unit_amount")) != NULL)
		jerror(&ctx, "Prices with \"custom_unit_amount\" (customer chooses) cannot be rated.");
	if ((v = jget(c, "billing_scheme")) != NULL)
		scheme = jstring(&ctx, v, "\"billing_scheme\"");

	if (strcmp(scheme, "per_unit") == 0)
	{
		if (jget(c, "tiers") != NULL)
			jerror(&ctx, "A per_unit price must not have \"tiers\".");
		stripe_amount(&ctx, c, "unit_amount", exponent, "", &p->amount, &present);
		if (!present)
			jerror(&ctx, "\"unit_amount_decimal\" or \"unit_amount\" is missing.");
		p->model = PRICE_UNIT;
	}
	else if (strcmp(scheme, "tiered") == 0)
	{
		char	   *mode;
		JsonbContainer *tc;

		if ((v = jget(c, "tiers_mode")) == NULL)
			jerror(&ctx, "\"tiers_mode\" is missing for a tiered price.");
		mode = jstring(&ctx, v, "\"tiers_mode\"");
		if (strcmp(mode, "graduated") == 0)
			p->model = PRICE_GRADUATED;
		else if (strcmp(mode, "volume") == 0)
			p->model = PRICE_VOLUME;
		else
			jerror(&ctx, "\"tiers_mode\" must be \"graduated\" or \"volume\", not \"%s\".", mode);
		tc = jtiers(&ctx, c, "\"tiers\" must be a JSON array (expand it when retrieving the price).",
					p);
		for (int i = 0; i < p->ntiers; i++)
		{
			JsonbValue *tv = getIthJsonbValueFromContainer(tc, i);
			JsonbContainer *t;
			char		where[64];
			bool		has_unit,
						has_flat;

			snprintf(where, sizeof(where), " of tier %d", i + 1);
			t = jobject(&ctx, tv, psprintf("tier %d", i + 1));
			v = jget(t, "up_to");
			if (v == NULL || jis_inf(v))
				p->tiers[i].inf = true;
			else
			{
				if (v->type != jbvNumeric)
					jerror(&ctx, "\"up_to\"%s must be an integer, null or \"inf\".", where);
				jnumber(&ctx, v, psprintf("\"up_to\"%s", where), &p->tiers[i].bound);
			}
			stripe_amount(&ctx, t, "unit_amount", exponent, where,
						  &p->tiers[i].unit, &has_unit);
			stripe_amount(&ctx, t, "flat_amount", exponent, where,
						  &p->tiers[i].fee, &has_flat);
			if (!has_unit && !has_flat)
				jerror(&ctx, "Tier %d has neither a unit amount nor a flat amount.", i + 1);
		}
	}
	else
		jerror(&ctx, "\"billing_scheme\" must be \"per_unit\" or \"tiered\", not \"%s\".", scheme);
	stripe_transform(&ctx, c, p);

	jvalidate(&ctx, p);
	PG_RETURN_POINTER(billing_price_encode(p));
}
