/*
 * money.h
 *		Currencies and rounding (money.c): the ISO 4217 minor-unit exponent
 *		of a currency, and rounding an amount to it with the mode of GUC
 *		billing.rounding.
 */
#ifndef BILLING_MONEY_H
#define BILLING_MONEY_H

#include "postgres.h"

#include "utils/numeric.h"

extern int	billing_currency_exponent(const char *code);
extern int	billing_currency_exponent_of(text *currency);
extern Numeric billing_round_money(Numeric amount, int exponent);

#endif							/* BILLING_MONEY_H */
