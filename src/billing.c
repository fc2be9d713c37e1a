/*
 * billing.c
 *		Module entry point of the billing extension: registers the GUCs
 *		(billing.rounding, billing.grace_period), reserves the "billing."
 *		prefix and initializes the other modules (worker.c defines the
 *		maintenance worker's GUCs and, when preloaded, registers it).
 *
 * billing.grace_period is a string setting read by a check hook, so that
 * it takes a time in the units of PostgreSQL's time settings ("1h",
 * "90min", "3600s", a bare number of seconds) as well as interval syntax
 * ("2 hours", "1 day 30 minutes", "PT90M").  A value set while the library
 * is loaded is checked at once (a bad one is an error).  A value set before
 * (SET in a session that has not called the extension yet, postgresql.conf,
 * ALTER DATABASE/ROLE SET) is only checked when the library loads; a bad
 * one is then kept, marked unreadable, and billing_grace_seconds (which
 * finalize_invoices calls) raises an error instead of falling back to the
 * default as PostgreSQL would (with a WARNING).
 */
#include "postgres.h"

#include <limits.h>

#include "access/parallel.h"
#include "datatype/timestamp.h"
#include "fmgr.h"
#include "tcop/utility.h"
#include "utils/datetime.h"
#include "common/int.h"
#include "utils/guc.h"

#include "audit.h"
#include "billing.h"
#include "catalog.h"
#include "ingest.h"
#include "worker.h"

PG_MODULE_MAGIC;

int			billing_rounding = BILLING_ROUND_HALF_UP;
int			billing_grace_period = 3600;

/* billing.grace_period as set, whether it could be read, what it means */
static char *grace_period_text = NULL;
static bool grace_period_valid = true;

/* the "extra" of a billing.grace_period value (see check_grace_period) */
typedef struct GraceValue
{
	bool		valid;
	int			seconds;
} GraceValue;

/* true while _PG_init defines the GUCs (values set before the load arrive) */
static bool billing_loading = false;

static const struct config_enum_entry rounding_options[] = {
	{"half_up", BILLING_ROUND_HALF_UP, false},
	{"half_even", BILLING_ROUND_HALF_EVEN, false},
	{"up", BILLING_ROUND_UP, false},
	{"down", BILLING_ROUND_DOWN, false},
	{NULL, 0, false}
};

void		_PG_init(void);

static ProcessUtility_hook_type prev_utility_hook = NULL;

PG_FUNCTION_INFO_V1(billing_grace_seconds);

/*
 * parse_grace
 *		Read a grace period: a time with an optional unit (seconds by
 *		default), as PostgreSQL's time settings take it, or an interval of
 *		days and time (no months: they have no fixed length).  Sets
 *		*seconds (rounded to whole seconds) and returns true when value is
 *		one of these, between 0 and INT_MAX seconds.
 */
static bool
parse_grace(const char *value, int *seconds)
{
	const char *hint;
	char		str[MAXDATELEN + 1];
	char		workbuf[MAXDATELEN + MAXDATEFIELDS];
	char	   *field[MAXDATEFIELDS];
	int			ftype[MAXDATEFIELDS];
	int			nf;
	int			dtype;
	int			dterr;
	struct pg_itm_in itm;
	int64		usec;

	if (value == NULL)
		return false;
	if (parse_int(value, seconds, GUC_UNIT_S, &hint))
		return *seconds >= 0;

	if (strlen(value) > MAXDATELEN)
		return false;
	strcpy(str, value);
	dterr = ParseDateTime(str, workbuf, sizeof(workbuf), field, ftype,
						  MAXDATEFIELDS, &nf);
	if (dterr == 0)
		dterr = DecodeInterval(field, ftype, nf, INTERVAL_FULL_RANGE, &dtype, &itm);
	if (dterr == DTERR_BAD_FORMAT)
		dterr = DecodeISO8601Interval(str, &dtype, &itm);
	if (dterr != 0 || dtype != DTK_DELTA || itm.tm_year != 0 || itm.tm_mon != 0)
		return false;
	if (pg_mul_s64_overflow((int64) itm.tm_mday, USECS_PER_DAY, &usec) ||
		pg_add_s64_overflow(usec, itm.tm_usec, &usec) ||
		usec < 0 || (usec + USECS_PER_SEC / 2) / USECS_PER_SEC > INT_MAX)
		return false;
	*seconds = (int) ((usec + USECS_PER_SEC / 2) / USECS_PER_SEC);
	return true;
}

/*
 * check_grace_period
 *		GUC check hook of billing.grace_period.  A value that cannot be read
 *		is refused, except while the library loads: then it is the value of
 *		a SET made before, which PostgreSQL would drop with a WARNING and
 *		replace by the default; it is kept instead, marked unreadable.  (A
 *		parallel worker copies the leader's values, unreadable ones too.)
 */
static bool
check_grace_period(char **newval, void **extra, GucSource source)
{
	GraceValue *v;
	int			seconds = 3600;
	bool		ok = parse_grace(*newval, &seconds);

	if (!ok && !billing_loading && !InitializingParallelWorker)
	{
		GUC_check_errdetail("A grace period is a time with a unit (\"1h\", \"90min\", "
							"\"3600s\") or an interval of days and time (\"2 hours\"), "
							"from 0 to %d seconds.", INT_MAX);
		return false;
	}
	v = malloc(sizeof(GraceValue));
	if (v == NULL)
		return false;
	v->valid = ok;
	v->seconds = ok ? seconds : 3600;
	*extra = v;
	return true;
}

/*
 * assign_grace_period
 *		GUC assign hook of billing.grace_period.
 */
static void
assign_grace_period(const char *newval, void *extra)
{
	GraceValue *v = (GraceValue *) extra;

	billing_grace_period = v->seconds;
	grace_period_valid = v->valid;
}

/*
 * billing_grace_seconds
 *		billing.grace_period in seconds.  Calling it loads the module; a
 *		value set before that could not be read raises an error (22023):
 *		finalize_invoices never runs with a grace period nobody chose.
 */
Datum
billing_grace_seconds(PG_FUNCTION_ARGS)
{
	if (!grace_period_valid)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid value for parameter \"billing.grace_period\": \"%s\"",
						grace_period_text ? grace_period_text : ""),
				 errdetail("The value was set before the billing library was loaded, "
						   "and could not be read when it was."),
				 errhint("Set a time with a unit (\"1h\", \"90min\", \"3600s\") "
						 "or an interval of days and time (\"2 hours\").")));
	PG_RETURN_INT32(billing_grace_period);
}

/*
 * billing_utility_hook
 *		ProcessUtility hook: what the maintenance worker needs before a
 *		database command, and a COPY into a metered table run here
 *		(ingest_copy.c); everything else goes on down the chain.
 */
static void
billing_utility_hook(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					 ProcessUtilityContext context, ParamListInfo params,
					 QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	billing_maint_before_utility(parsetree);
	if (IsA(parsetree, CopyStmt) &&
		billing_copy_metered((CopyStmt *) parsetree, queryString, queryEnv, qc))
		return;

	if (prev_utility_hook)
		prev_utility_hook(pstmt, queryString, readOnlyTree, context, params,
						  queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

/*
 * _PG_init
 *		Define the GUCs, set up per-backend state of the modules and install
 *		the ProcessUtility hook.
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

	billing_loading = true;
	DefineCustomStringVariable("billing.grace_period",
							   "How long after a billing period ends before it may be finalized.",
							   "A time with a unit (1h, 90min, 3600s) or an interval (2 hours). "
							   "Late usage arriving within the grace period is billed on the invoice itself.",
							   &grace_period_text,
							   "1h",
							   PGC_USERSET,
							   0,
							   check_grace_period, assign_grace_period, NULL);
	billing_loading = false;

	billing_worker_init();

	MarkGUCPrefixReserved("billing");

	billing_catalog_init();
	billing_accounts_cache_init();
	billing_ingest_init();
	billing_audit_init();

	prev_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = billing_utility_hook;
}
