/*
 * billing.h
 *		Declarations shared by the modules of the billing extension:
 *		configuration variables (GUCs) and cross-module entry points.
 */
#ifndef BILLING_H
#define BILLING_H

#include "postgres.h"
#include "utils/numeric.h"

/* billing.rounding: how money is rounded to the currency's minor unit */
typedef enum BillingRounding
{
	BILLING_ROUND_HALF_UP,		/* ties away from zero (default) */
	BILLING_ROUND_HALF_EVEN,	/* ties to the even digit */
	BILLING_ROUND_UP,			/* away from zero */
	BILLING_ROUND_DOWN			/* toward zero */
} BillingRounding;

extern int	billing_rounding;

/* billing.grace_period, in seconds */
extern int	billing_grace_period;

/* quantity.c: usage quantities are below 10^1000, with at most 1000 fraction digits */
#define BILLING_QTY_DIGITS	1000
extern void billing_check_quantity(Numeric q, const char *meter, int64 account_id);

/* ingest_trigger.c */
extern void billing_ingest_init(void);

/* worker.c */
extern void billing_worker_init(void);
extern bool billing_parse_duration(const char *value, int64 *usecs);

#endif							/* BILLING_H */
