/*
 * billing.c
 *		Module entry point of the billing extension: registers the GUCs
 *		(billing.rounding, billing.grace_period), reserves the "billing."
 *		prefix and initializes the other modules (worker.c defines the
 *		maintenance worker's GUCs and, when preloaded, registers it).
 */
#include "postgres.h"

#include <limits.h>

#include "fmgr.h"
#include "utils/guc.h"

#include "audit.h"
#include "billing.h"

PG_MODULE_MAGIC;

int			billing_rounding = BILLING_ROUND_HALF_UP;
int			billing_grace_period = 3600;

static const struct config_enum_entry rounding_options[] = {
	{"half_up", BILLING_ROUND_HALF_UP, false},
	{"half_even", BILLING_ROUND_HALF_EVEN, false},
	{"up", BILLING_ROUND_UP, false},
	{"down", BILLING_ROUND_DOWN, false},
	{NULL, 0, false}
};

void		_PG_init(void);

PG_FUNCTION_INFO_V1(billing_grace_seconds);

/*
 * billing_grace_seconds
 *		billing.grace_period in seconds.  Calling it loads the module, so a
 *		value set before the module was loaded has been validated.
 */
Datum
billing_grace_seconds(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT32(billing_grace_period);
}

/*
 * _PG_init
 *		Define the GUCs and set up per-backend state of the modules.
 */
void
_PG_init(void)
{
	DefineCustomEnumVariable("billing.rounding",
							 "How money is rounded to the currency's minor unit.",
							 "half_up rounds ties away from zero, half_even to the even digit, "
							 "up away from zero, down toward zero.",
							 &billing_rounding,
							 BILLING_ROUND_HALF_UP,
							 rounding_options,
							 PGC_USERSET,
							 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("billing.grace_period",
							"How long after a billing period ends before it may be finalized.",
							"Late usage arriving within the grace period is billed on the invoice itself.",
							&billing_grace_period,
							3600,
							0,
							INT_MAX,
							PGC_USERSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	billing_worker_init();

	MarkGUCPrefixReserved("billing");

	billing_ingest_init();
	audit_init();
}
