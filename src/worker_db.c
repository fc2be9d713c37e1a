/*
 * worker_db.c
 *		The maintenance worker of one database: a dynamic background worker
 *		connected to it.  When billing is not installed there it exits at
 *		once: the launcher asks again at its next pass, which is how a
 *		database created later, or CREATE EXTENSION later, is found.
 *		Otherwise it runs the jobs every interval, checks every few seconds
 *		that the extension is still there (it exits after DROP EXTENSION)
 *		and that the database-level billing.* settings did not change (if
 *		they did, it exits and the launcher starts it again at once, so
 *		that the new process reads them), and exits on SIGTERM or when the
 *		interval becomes 0.
 *
 * Every billing.maintenance_interval it runs billing.compact_usage(),
 * billing.purge_dedupe(now()) and, when billing.auto_finalize is on,
 * billing.finalize_invoices(now()), each in its own transaction, as the
 * extension's owner.  A job that fails is logged (the error, with a context
 * line naming the job) and runs again at the next interval.
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

/* each returns one bigint: cells merged, event ids removed, invoices made */
static const char *const job_sql[NUM_JOBS] = {
	"SELECT billing.compact_usage()",
	"SELECT billing.purge_dedupe(pg_catalog.now())",
	"SELECT pg_catalog.count(*) FROM billing.finalize_invoices(pg_catalog.now())"
};

/* in a worker: its slot, and whether to free it on exit */
static MaintSlot *my_slot = NULL;
static bool free_slot_on_exit = false;

/* ---------------------------------------------------------------------
 * The worker
 * ---------------------------------------------------------------------
 */

/* what the worker found when it checked its database */
typedef enum CheckResult
{
	CHECK_READY,				/* billing installed: run */
	CHECK_NO_EXTENSION,
	CHECK_UNAVAILABLE,			/* a template now, or no connections */
	CHECK_SETTINGS_CHANGED		/* database-level billing.* settings */
} CheckResult;

/* the extension's owner, found by the last check */
static Oid	ext_owner = InvalidOid;
static bool ext_owner_super = false;
static bool has_gate = false;	/* billing._maintenance_runs_here exists */
static char *settings_seen = NULL;	/* as first read, in TopMemoryContext */
static char *my_dbname = NULL;	/* for the context line of errors */
static MemoryContext worker_cxt = NULL; /* errors of a run; reset after it */

/*
 * worker_detach
 *		On exit of a worker: give its slot back (the launcher may start
 *		another), record a run it did not finish as failed, and free the
 *		slot when there is nothing to show in this database.
 */
static void
worker_detach(int code, Datum arg)
{
	int			j;

	if (my_slot == NULL)
		return;
	if (LWLockHeldByMe(billing_maint->lock))
		LWLockRelease(billing_maint->lock);
	LWLockAcquire(billing_maint->lock, LW_EXCLUSIVE);
	if (my_slot->pid == MyProcPid)
	{
		my_slot->pid = 0;
		for (j = 0; j < NUM_JOBS; j++)
		{
			JobStatus  *js = &my_slot->jobs[j];

			if (js->result != RESULT_RUNNING)
				continue;
			js->result = RESULT_ERROR;
			js->duration_us = GetCurrentTimestamp() - js->started;
			js->has_value = false;
			strlcpy(js->error, "the worker exited during the run", MAINT_ERRLEN);
			js->runs++;
			js->failures++;
		}
		if (free_slot_on_exit)
			memset(my_slot, 0, sizeof(MaintSlot));
	}
	LWLockRelease(billing_maint->lock);
	my_slot = NULL;
}

/*
 * check_database
 *		In a transaction of its own: is billing installed here (and who owns
 *		it), may a worker still connect, and are the database-level
 *		billing.* settings the ones this process started with?
 */
static CheckResult
check_database(void)
{
	static const char *sql =
		"SELECT e.extowner, a.rolsuper,"
		"       pg_catalog.to_regprocedure('billing._maintenance_runs_here(text)') IS NOT NULL,"
		"       (SELECT d.datallowconn AND NOT d.datistemplate"
		"          FROM pg_catalog.pg_database d WHERE d.oid = $1),"
		"       (SELECT pg_catalog.string_agg(s, E'\\n' ORDER BY s)"
		"          FROM pg_catalog.pg_db_role_setting r, pg_catalog.unnest(r.setconfig) s"
		"         WHERE r.setdatabase = $1 AND r.setrole = 0 AND s LIKE 'billing.%')"
		"  FROM (SELECT) x"
		"  LEFT JOIN pg_catalog.pg_extension e ON e.extname = 'billing'"
		"  LEFT JOIN pg_catalog.pg_roles a ON a.oid = e.extowner";
	Oid			argtypes[1] = {OIDOID};
	Datum		args[1];
	CheckResult result = CHECK_READY;
	bool		isnull;
	Datum		d;
	char	   *settings;
	TupleDesc	desc;
	HeapTuple	row;

	args[0] = ObjectIdGetDatum(MyDatabaseId);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "billing maintenance: checking the database");

	if (SPI_execute_with_args(sql, 1, argtypes, args, NULL, true, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "billing maintenance: the database check returned no row");
	desc = SPI_tuptable->tupdesc;
	row = SPI_tuptable->vals[0];

	d = SPI_getbinval(row, desc, 1, &isnull);
	if (isnull)
		result = CHECK_NO_EXTENSION;
	else
	{
		ext_owner = DatumGetObjectId(d);
		d = SPI_getbinval(row, desc, 2, &isnull);
		ext_owner_super = !isnull && DatumGetBool(d);
		d = SPI_getbinval(row, desc, 3, &isnull);
		has_gate = !isnull && DatumGetBool(d);
	}
	d = SPI_getbinval(row, desc, 4, &isnull);
	if (isnull || !DatumGetBool(d))
		result = CHECK_UNAVAILABLE;

	if (my_dbname == NULL)
	{
		char	   *name = get_database_name(MyDatabaseId);

		my_dbname = MemoryContextStrdup(TopMemoryContext, name ? name : "?");
	}
	settings = SPI_getvalue(row, desc, 5);
	if (settings == NULL)
		settings = "";
	if (settings_seen == NULL)
		settings_seen = MemoryContextStrdup(TopMemoryContext, settings);
	else if (strcmp(settings, settings_seen) != 0 && result == CHECK_READY)
		result = CHECK_SETTINGS_CHANGED;

	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
	return result;
}

/* errcontext of a job's errors */
static void
job_error_context(void *arg)
{
	errcontext("billing maintenance job %s in database \"%s\"",
			   (const char *) arg, my_dbname ? my_dbname : "?");
}

/*
 * set_status
 *		Record the outcome of a job's run in the shared slot.
 */
static void
set_status(MaintJob job, MaintResult result, TimestampTz started,
		   bool has_value, int64 value, ErrorData *edata)
{
	JobStatus  *js = &my_slot->jobs[job];

	LWLockAcquire(billing_maint->lock, LW_EXCLUSIVE);
	js->result = result;
	if (result == RESULT_RUNNING)
		js->started = started;
	else if (result == RESULT_OK || result == RESULT_ERROR)
	{
		js->started = started;
		js->duration_us = GetCurrentTimestamp() - started;
		js->has_value = has_value;
		js->value = value;
		js->runs++;
		if (result == RESULT_OK)
		{
			js->last_success = js->started;
			js->error[0] = '\0';
		}
		else
		{
			js->failures++;
			snprintf(js->error, MAINT_ERRLEN, "%s: %s",
					 unpack_sql_state(edata->sqlerrcode),
					 edata->message ? edata->message : "(no message)");
		}
	}
	LWLockRelease(billing_maint->lock);
}

/*
 * run_job
 *		Run one job in a transaction of its own.  An error is logged (with a
 *		context line naming the job), rolled back and recorded; the worker
 *		goes on.  On Citus, billing._maintenance_runs_here(job) decides
 *		whether this node runs it.  Returns false, having run nothing, when
 *		the extension is gone.
 */
static bool
run_job(MaintJob job)
{
	TimestampTz started = GetCurrentTimestamp();
	volatile bool gone = false;
	volatile bool skipped = false;
	volatile bool has_value = false;
	volatile int64 value = 0;
	ErrorData  *edata = NULL;
	ErrorContextCallback errcb;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	errcb.callback = job_error_context;
	errcb.arg = (void *) billing_maint_job_names[job];
	errcb.previous = error_context_stack;
	PG_TRY();
	{
		Oid			extoid;
		bool		isnull;
		Datum		d;

		error_context_stack = &errcb;

		/*
		 * Hold the extension for the run: DROP EXTENSION waits for it, and
		 * a run that waited for DROP EXTENSION finds it gone.
		 */
		extoid = get_extension_oid("billing", true);
		if (OidIsValid(extoid))
		{
			LockDatabaseObject(ExtensionRelationId, extoid, 0, AccessShareLock);
			if (get_extension_oid("billing", true) != extoid)
				extoid = InvalidOid;
		}
		gone = !OidIsValid(extoid);
		if (!gone)
		{
			set_status(job, RESULT_RUNNING, started, false, 0, NULL);
			SPI_connect();
			PushActiveSnapshot(GetTransactionSnapshot());
			pgstat_report_activity(STATE_RUNNING, job_sql[job]);
			if (has_gate)
			{
				Oid			argtypes[1] = {TEXTOID};
				Datum		args[1];

				args[0] = CStringGetTextDatum(billing_maint_job_names[job]);
				if (SPI_execute_with_args("SELECT billing._maintenance_runs_here($1)",
										  1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT ||
					SPI_processed != 1)
					elog(ERROR, "billing._maintenance_runs_here returned no row");
				d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
				skipped = isnull || !DatumGetBool(d);
			}
			if (!skipped)
			{
				if (SPI_execute(job_sql[job], false, 1) != SPI_OK_SELECT ||
					SPI_processed != 1)
					elog(ERROR, "billing maintenance job %s returned no row", billing_maint_job_names[job]);
				d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
				has_value = !isnull;
				value = isnull ? 0 : DatumGetInt64(d);
			}
			SPI_finish();
			PopActiveSnapshot();
		}
		error_context_stack = errcb.previous;
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(worker_cxt);
		edata = CopyErrorData();
		EmitErrorReport();
		AbortOutOfAnyTransaction();
		FlushErrorState();
		RESUME_INTERRUPTS();
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);

	if (edata != NULL)
	{
		set_status(job, RESULT_ERROR, started, false, 0, edata);
		FreeErrorData(edata);
	}
	else if (gone)
		return false;
	else if (skipped)
		set_status(job, RESULT_SKIPPED, started, false, 0, NULL);
	else
		set_status(job, RESULT_OK, started, has_value, value, NULL);
	return true;
}

/*
 * run_jobs
 *		One run: every job in turn, as the extension's owner (session and
 *		current user both, as after SET SESSION AUTHORIZATION, so the audit
 *		rows of finalized invoices name it).
 */
static void
run_jobs(void)
{
	int			j;

	SetSessionAuthorization(ext_owner, ext_owner_super);
	for (j = 0; j < NUM_JOBS; j++)
	{
		CHECK_FOR_INTERRUPTS();
		if (j == JOB_FINALIZE && !billing_auto_finalize)
		{
			set_status(j, RESULT_OFF, 0, false, 0, NULL);
			continue;
		}
		if (!run_job((MaintJob) j))
			break;				/* DROP EXTENSION; the next check exits */
	}
	MemoryContextReset(worker_cxt);
}

/*
 * billing_maintenance_worker_main
 *		Entry point of a database's worker (slot in main_arg, database in
 *		bgw_extra).  The first run comes one interval after the start.
 */
void
billing_maintenance_worker_main(Datum main_arg)
{
	int			i = DatumGetInt32(main_arg);
	Oid			dbid;
	MaintSlot  *slot;
	bool		mine = false;
	TimestampTz base;
	TimestampTz last_check;

	memcpy(&dbid, MyBgworkerEntry->bgw_extra, sizeof(Oid));
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	if (i < 0 || i >= billing_maint->nslots)
		proc_exit(0);
	slot = &billing_maint->slots[i];
	LWLockAcquire(billing_maint->lock, LW_EXCLUSIVE);
	if (slot->dbid == dbid && slot->pid == 0 &&
		slot->paused_until <= GetCurrentTimestamp())
	{
		slot->pid = MyProcPid;
		slot->restart = false;
		mine = true;
	}
	LWLockRelease(billing_maint->lock);
	if (!mine)
		proc_exit(0);			/* another worker has it, or paused */
	my_slot = slot;
	before_shmem_exit(worker_detach, (Datum) 0);

	BackgroundWorkerInitializeConnectionByOid(dbid, InvalidOid, 0);
	worker_cxt = AllocSetContextCreate(TopMemoryContext, "billing maintenance",
									   ALLOCSET_DEFAULT_SIZES);
	/* every query the worker writes resolves names in pg_catalog first */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);

	base = GetCurrentTimestamp();
	last_check = 0;
	for (;;)
	{
		TimestampTz now;
		TimestampTz next_run;
		TimestampTz wake;
		bool		due;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (billing_maintenance_interval_ms <= 0)
			proc_exit(0);		/* off; the launcher starts one when on */

		now = GetCurrentTimestamp();
		next_run = TimestampTzPlusMilliseconds(base, billing_maintenance_interval_ms);
		due = now >= next_run;
		if (due || last_check == 0 ||
			now >= TimestampTzPlusMilliseconds(last_check, MAINT_CHECK_MS))
		{
			switch (check_database())
			{
				case CHECK_READY:
					break;
				case CHECK_NO_EXTENSION:
				case CHECK_UNAVAILABLE:
					free_slot_on_exit = true;
					proc_exit(0);
					break;
				case CHECK_SETTINGS_CHANGED:
					LWLockAcquire(billing_maint->lock, LW_EXCLUSIVE);
					my_slot->restart = true;
					LWLockRelease(billing_maint->lock);
					proc_exit(0);
					break;
			}
			last_check = GetCurrentTimestamp();
		}
		if (due)
		{
			base = GetCurrentTimestamp();
			run_jobs();
			next_run = TimestampTzPlusMilliseconds(base, billing_maintenance_interval_ms);
		}

		LWLockAcquire(billing_maint->lock, LW_EXCLUSIVE);
		my_slot->next_run = next_run;
		LWLockRelease(billing_maint->lock);

		wake = Min(next_run, TimestampTzPlusMilliseconds(last_check, MAINT_CHECK_MS));
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 billing_maint_interval_timeout(wake), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
