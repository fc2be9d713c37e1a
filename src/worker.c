/*
 * worker.c
 *		The maintenance background worker (SPEC 10.3).
 *
 * With billing in shared_preload_libraries, a launcher starts one worker per
 * database that has the extension installed.  Every
 * billing.maintenance_interval each worker runs billing.compact_usage(),
 * billing.purge_dedupe(now()) and, when billing.auto_finalize is on,
 * billing.finalize_invoices(now()), each in its own transaction, as the
 * extension's owner.  A job that fails is logged (the error, with a context
 * line naming the job) and runs again at the next interval.  Without the
 * preload nothing here is registered: the functions work by hand.
 *
 * The processes:
 *
 *	launcher	a static background worker connected to no database.  At
 *				start, and then every interval, it lists the databases that
 *				accept connections (templates excluded) and starts a worker in
 *				each that has none.  The postmaster starts it again after a
 *				crash (bgw_restart_time).
 *	worker		a dynamic background worker connected to one database.  When
 *				billing is not installed there it exits at once: the launcher
 *				asks again at its next pass, which is how a database created
 *				later, or CREATE EXTENSION later, is found.  Otherwise it runs
 *				the jobs every interval, checks every few seconds that the
 *				extension is still there (it exits after DROP EXTENSION) and
 *				that the database-level billing.* settings did not change (if
 *				they did, it exits and the launcher starts it again at once,
 *				so that the new process reads them), and exits on SIGTERM or
 *				when the interval becomes 0.
 *
 * What the jobs did is kept in shared memory, one slot per database, and
 * shown by billing._maintenance_status() (the view billing.maintenance_status).
 * Nothing is written to the database: no WAL, nothing for pg_dump, no table
 * for Citus to distribute or for the audit rules to cover; a restart of the
 * server starts the record afresh.
 *
 * Commands that need a database nobody is connected to (DROP DATABASE,
 * ALTER DATABASE ... RENAME TO / SET TABLESPACE, CREATE DATABASE ...
 * TEMPLATE) wait up to 5 seconds for other sessions and then fail; a
 * worker is such a session.  A ProcessUtility hook therefore stops the
 * worker of that database first (SIGTERM, then waits for it to exit) and
 * keeps the launcher from starting one there for a few seconds, by which
 * time the command holds the database lock that makes new connections wait.
 */
#include "postgres.h"

#include <signal.h>
#include <unistd.h>

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "commands/extension.h"
#include "common/int.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "tcop/tcopprot.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "billing.h"
#include "worker.h"

/* the names of the jobs, in the order a run executes them */
const char *const billing_maint_job_names[NUM_JOBS] = {
	"compact_usage", "purge_dedupe", "finalize_invoices"
};

/* GUCs */
static char *maintenance_interval_text = NULL;
int64 billing_maintenance_interval_ms = 60000;
bool billing_auto_finalize = false;

/* ---------------------------------------------------------------------
 * Reading durations
 * ---------------------------------------------------------------------
 */

/*
 * billing_parse_duration
 *		Read a duration the way a time setting is written: a number with a
 *		unit ("500ms", "30s", "1min", "1h", "1d"), a bare number of
 *		seconds, or interval syntax ("2 hours", "1 minute 30 seconds",
 *		"01:30:00", ISO 8601 "PT90M").  Months count 30 days, years 12
 *		months.  Sets *usecs and returns true, or returns false when the
 *		text is not a duration.  Never raises an error (GUC check hooks
 *		call it).
 */
bool
billing_parse_duration(const char *value, int64 *usecs)
{
	char		workbuf[MAXDATELEN + 1];
	char		isobuf[MAXDATELEN + 1];
	char	   *field[MAXDATEFIELDS];
	int			ftype[MAXDATEFIELDS];
	int			nf;
	int			dtype = 0;
	int			dterr;
	struct pg_itm_in itm;
	int64		days;
	int64		total;

	if (value == NULL || strlen(value) > MAXDATELEN)
		return false;
	memset(&itm, 0, sizeof(itm));
	dterr = ParseDateTime(value, workbuf, sizeof(workbuf), field, ftype,
						  MAXDATEFIELDS, &nf);
	if (dterr == 0)
		dterr = DecodeInterval(field, ftype, nf, INTERVAL_FULL_RANGE,
							   &dtype, &itm);
	if (dterr == DTERR_BAD_FORMAT)
	{
		strlcpy(isobuf, value, sizeof(isobuf));
		memset(&itm, 0, sizeof(itm));
		dterr = DecodeISO8601Interval(isobuf, &dtype, &itm);
	}
	if (dterr != 0 || dtype != DTK_DELTA)
		return false;

	days = (int64) itm.tm_year * 12 * 30 + (int64) itm.tm_mon * 30 +
		itm.tm_mday;
	if (pg_mul_s64_overflow(days, USECS_PER_DAY, &total) ||
		pg_add_s64_overflow(total, itm.tm_usec, &total))
		return false;
	*usecs = total;
	return true;
}

/*
 * check_maintenance_interval
 *		GUC check hook of billing.maintenance_interval: 0 (off), or a
 *		duration from 1 second to 1 year.  Passes the value in ms on.
 */
static bool
check_maintenance_interval(char **newval, void **extra, GucSource source)
{
	int64		us;
	int64	   *ms;

	if (!billing_parse_duration(*newval, &us))
	{
		GUC_check_errdetail("\"%s\" is not a duration: write it with a unit (\"30s\", \"1min\", \"1h\") or as an interval (\"2 hours\").",
							*newval);
		return false;
	}
	if (us < 0 || (us > 0 && us < USECS_PER_SEC) ||
		us > (int64) 365 * USECS_PER_DAY)
	{
		GUC_check_errdetail("The interval must be 0 (off) or between 1 second and 1 year.");
		return false;
	}
	ms = (int64 *) malloc(sizeof(int64));
	if (ms == NULL)
		return false;
	*ms = us / 1000;
	*extra = ms;
	return true;
}

/*
 * assign_maintenance_interval
 *		GUC assign hook of billing.maintenance_interval.
 */
static void
assign_maintenance_interval(const char *newval, void *extra)
{
	billing_maintenance_interval_ms = *(int64 *) extra;
}

/*
 * billing_maint_interval_timeout
 *		Milliseconds from now until t, between 0 and 10 minutes (WaitLatch
 *		takes a long; a longer wait just loops).
 */
long
billing_maint_interval_timeout(TimestampTz t)
{
	long		ms = (long) ((t - GetCurrentTimestamp()) / 1000);

	return Min(Max(ms, 0), 600000L);
}

/* ---------------------------------------------------------------------
 * Set-up
 * ---------------------------------------------------------------------
 */

/*
 * billing_worker_init
 *		From _PG_init: define billing.maintenance_interval and
 *		billing.auto_finalize; when billing is being preloaded, also
 *		reserve the shared state, register the launcher and hook the
 *		database commands.
 */
void
billing_worker_init(void)
{
	BackgroundWorker bgw;

	DefineCustomStringVariable("billing.maintenance_interval",
							   "How often the maintenance worker runs its jobs in each database.",
							   "A duration with a unit (\"30s\", \"1min\", \"1h\") or interval syntax "
							   "(\"2 hours\"); 0 turns the worker off.  Needs billing in "
							   "shared_preload_libraries.",
							   &maintenance_interval_text,
							   "1min",
							   PGC_SUSET,
							   0,
							   check_maintenance_interval,
							   assign_maintenance_interval,
							   NULL);
	DefineCustomBoolVariable("billing.auto_finalize",
							 "Whether the maintenance worker also runs billing.finalize_invoices(now()).",
							 NULL,
							 &billing_auto_finalize,
							 false,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	if (!process_shared_preload_libraries_in_progress)
		return;

	billing_maint_shmem_install();

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = 10;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "billing");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "billing_maintenance_launcher_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "billing maintenance launcher");
	snprintf(bgw.bgw_type, BGW_MAXLEN, "billing maintenance launcher");
	RegisterBackgroundWorker(&bgw);
}
