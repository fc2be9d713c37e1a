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

/* the jobs, in the order a run executes them */
typedef enum MaintJob
{
	JOB_COMPACT,
	JOB_PURGE,
	JOB_FINALIZE,
	NUM_JOBS
} MaintJob;

static const char *const job_names[NUM_JOBS] = {
	"compact_usage", "purge_dedupe", "finalize_invoices"
};

/* each returns one bigint: cells merged, event ids removed, invoices made */
static const char *const job_sql[NUM_JOBS] = {
	"SELECT billing.compact_usage()",
	"SELECT billing.purge_dedupe(pg_catalog.now())",
	"SELECT pg_catalog.count(*) FROM billing.finalize_invoices(pg_catalog.now())"
};

/* the outcome of a job's last run */
typedef enum MaintResult
{
	RESULT_NONE,				/* never ran */
	RESULT_RUNNING,
	RESULT_OK,
	RESULT_ERROR,
	RESULT_SKIPPED,				/* billing._maintenance_runs_here said no */
	RESULT_OFF					/* finalize_invoices: billing.auto_finalize off */
} MaintResult;

static const char *const result_names[] = {
	NULL, "running", "ok", "error", "skipped", "off"
};

#define MAINT_ERRLEN		512
/* how often a worker checks its database between runs, in ms */
#define MAINT_CHECK_MS		5000
/* how long a stopped worker is not started again, in ms */
#define MAINT_PAUSE_MS		5000
/* the longest a database command waits for a worker to exit, in ms */
#define MAINT_STOP_WAIT_MS	10000

typedef struct JobStatus
{
	MaintResult result;
	TimestampTz started;		/* start of the last run, 0: never */
	int64		duration_us;
	bool		has_value;
	int64		value;			/* what the job returned */
	char		error[MAINT_ERRLEN];	/* "SQLSTATE: message" of a failure */
	int64		runs;
	int64		failures;
	TimestampTz last_success;
} JobStatus;

/* one database */
typedef struct MaintSlot
{
	Oid			dbid;			/* InvalidOid: the slot is free */
	pid_t		pid;			/* its worker while one runs, else 0 */
	bool		restart;		/* the worker exited to be started again */
	TimestampTz paused_until;	/* no worker is started before this */
	TimestampTz next_run;
	JobStatus	jobs[NUM_JOBS];
} MaintSlot;

typedef struct MaintShared
{
	LWLock	   *lock;			/* protects everything below */
	pid_t		launcher_pid;
	int			nslots;
	MaintSlot	slots[FLEXIBLE_ARRAY_MEMBER];
} MaintShared;

/* GUCs */
static char *maintenance_interval_text = NULL;
static int64 maintenance_interval_ms = 60000;
static bool auto_finalize = false;

static MaintShared *maint = NULL;
static int	maint_nslots = 0;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static ProcessUtility_hook_type prev_ProcessUtility = NULL;

/* in a worker: its slot, and whether to free it on exit */
static MaintSlot *my_slot = NULL;
static bool free_slot_on_exit = false;

PGDLLEXPORT void billing_maintenance_launcher_main(Datum main_arg);
PGDLLEXPORT void billing_maintenance_worker_main(Datum main_arg);

PG_FUNCTION_INFO_V1(billing_maintenance_status);

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
	maintenance_interval_ms = *(int64 *) extra;
}

/* ---------------------------------------------------------------------
 * Shared memory
 * ---------------------------------------------------------------------
 */

/*
 * maint_shmem_size
 *		Bytes of the shared state: one slot per possible background
 *		worker, since each database with the extension needs one.
 */
static Size
maint_shmem_size(void)
{
	return add_size(offsetof(MaintShared, slots),
					mul_size(sizeof(MaintSlot), maint_nslots));
}

/*
 * maint_shmem_request
 *		shmem_request_hook: reserve the shared state and its lock.
 */
static void
maint_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	maint_nslots = Max(max_worker_processes, 1);
	RequestAddinShmemSpace(maint_shmem_size());
	RequestNamedLWLockTranche("billing_maintenance", 1);
}

/*
 * maint_shmem_startup
 *		shmem_startup_hook: attach to (and the first time, zero) the shared
 *		state.
 */
static void
maint_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	maint_nslots = Max(max_worker_processes, 1);
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	maint = ShmemInitStruct("billing maintenance", maint_shmem_size(), &found);
	if (!found)
	{
		memset(maint, 0, maint_shmem_size());
		maint->nslots = maint_nslots;
		maint->lock = &(GetNamedLWLockTranche("billing_maintenance"))->lock;
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * find_slot
 *		The slot of database dbid, or NULL.  Caller holds maint->lock.
 */
static MaintSlot *
find_slot(Oid dbid)
{
	int			i;

	for (i = 0; i < maint->nslots; i++)
		if (maint->slots[i].dbid == dbid)
			return &maint->slots[i];
	return NULL;
}

/* ---------------------------------------------------------------------
 * Database commands that need the database free of sessions
 * ---------------------------------------------------------------------
 */

/*
 * stop_database_worker
 *		Stop the worker of database dbname, if it has one, before a command
 *		that fails while other sessions are connected to it.  Only for a
 *		caller who owns the database (for anybody else the command fails
 *		anyway).  Waits until the worker has exited, at most
 *		MAINT_STOP_WAIT_MS; the launcher does not start one there again
 *		for MAINT_PAUSE_MS.
 */
static void
stop_database_worker(const char *dbname)
{
	Oid			dbid = get_database_oid(dbname, true);
	MaintSlot  *slot;
	pid_t		pid = 0;
	int			waited;

	if (!OidIsValid(dbid) || dbid == MyDatabaseId ||
		!pg_database_ownercheck(dbid, GetUserId()))
		return;

	LWLockAcquire(maint->lock, LW_EXCLUSIVE);
	slot = find_slot(dbid);
	if (slot != NULL)
	{
		slot->paused_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														 MAINT_PAUSE_MS);
		pid = slot->pid;
	}
	LWLockRelease(maint->lock);
	if (pid == 0)
		return;

	if (kill(pid, SIGTERM) != 0)
		return;
	for (waited = 0; waited < MAINT_STOP_WAIT_MS; waited += 10)
	{
		pid_t		now_pid;

		LWLockAcquire(maint->lock, LW_SHARED);
		now_pid = (slot->dbid == dbid) ? slot->pid : 0;
		LWLockRelease(maint->lock);
		if (now_pid != pid)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 10, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * maint_utility_hook
 *		ProcessUtility hook: before DROP DATABASE, ALTER DATABASE ...
 *		RENAME TO, ALTER DATABASE ... SET TABLESPACE and CREATE DATABASE
 *		... TEMPLATE, stop the worker of the database concerned.
 */
static void
maint_utility_hook(PlannedStmt *pstmt, const char *queryString,
				   bool readOnlyTree, ProcessUtilityContext context,
				   ParamListInfo params, QueryEnvironment *queryEnv,
				   DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;
	const char *dbname = NULL;
	ListCell   *lc;

	switch (nodeTag(parsetree))
	{
		case T_DropdbStmt:
			dbname = ((DropdbStmt *) parsetree)->dbname;
			break;
		case T_RenameStmt:
			if (((RenameStmt *) parsetree)->renameType == OBJECT_DATABASE)
				dbname = ((RenameStmt *) parsetree)->subname;
			break;
		case T_AlterDatabaseStmt:
			foreach(lc, ((AlterDatabaseStmt *) parsetree)->options)
			{
				DefElem    *d = (DefElem *) lfirst(lc);

				if (strcmp(d->defname, "tablespace") == 0)
					dbname = ((AlterDatabaseStmt *) parsetree)->dbname;
			}
			break;
		case T_CreatedbStmt:
			foreach(lc, ((CreatedbStmt *) parsetree)->options)
			{
				DefElem    *d = (DefElem *) lfirst(lc);

				if (strcmp(d->defname, "template") == 0 && d->arg != NULL)
					dbname = defGetString(d);
			}
			break;
		default:
			break;
	}
	if (dbname != NULL && maint != NULL)
		stop_database_worker(dbname);

	if (prev_ProcessUtility)
		prev_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
							queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

/* ---------------------------------------------------------------------
 * The launcher
 * ---------------------------------------------------------------------
 */

/*
 * interval_timeout
 *		Milliseconds from now until t, between 0 and 10 minutes (WaitLatch
 *		takes a long; a longer wait just loops).
 */
static long
interval_timeout(TimestampTz t)
{
	long		ms = (long) ((t - GetCurrentTimestamp()) / 1000);

	return Min(Max(ms, 0), 600000L);
}

/*
 * start_worker
 *		Register a worker for database dbid in slot i.  Returns its handle,
 *		or NULL when no background worker slot is free.
 */
static BackgroundWorkerHandle *
start_worker(int i, Oid dbid)
{
	BackgroundWorker bgw;
	BackgroundWorkerHandle *handle;
	MemoryContext old;
	bool		ok;
	static bool warned = false;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "billing");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "billing_maintenance_worker_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "billing maintenance worker");
	snprintf(bgw.bgw_type, BGW_MAXLEN, "billing maintenance worker");
	bgw.bgw_main_arg = Int32GetDatum(i);
	memcpy(bgw.bgw_extra, &dbid, sizeof(Oid));
	bgw.bgw_notify_pid = MyProcPid;

	old = MemoryContextSwitchTo(TopMemoryContext);
	ok = RegisterDynamicBackgroundWorker(&bgw, &handle);
	MemoryContextSwitchTo(old);
	if (!ok)
	{
		if (!warned)
			ereport(LOG,
					(errmsg("billing maintenance: no background worker slot free for database %u", dbid),
					 errhint("Raise max_worker_processes.")));
		warned = true;
		return NULL;
	}
	warned = false;
	return handle;
}

/*
 * launcher_reap
 *		Forget the handles of workers that stopped, and start again at once
 *		those that exited to be restarted.
 */
static void
launcher_reap(BackgroundWorkerHandle **handles)
{
	int			i;
	TimestampTz now = GetCurrentTimestamp();

	for (i = 0; i < maint->nslots; i++)
	{
		pid_t		pid;
		Oid			dbid = InvalidOid;

		if (handles[i] != NULL &&
			GetBackgroundWorkerPid(handles[i], &pid) == BGWH_STOPPED)
		{
			pfree(handles[i]);
			handles[i] = NULL;
		}
		if (handles[i] != NULL)
			continue;
		LWLockAcquire(maint->lock, LW_EXCLUSIVE);
		if (maint->slots[i].restart && maint->slots[i].pid == 0 &&
			OidIsValid(maint->slots[i].dbid) &&
			maint->slots[i].paused_until <= now)
		{
			maint->slots[i].restart = false;
			dbid = maint->slots[i].dbid;
		}
		LWLockRelease(maint->lock);
		if (OidIsValid(dbid))
			handles[i] = start_worker(i, dbid);
	}
}

/*
 * launcher_scan
 *		List the databases a worker may run in (accepting connections, not
 *		a template, not half-dropped), free the slots of databases that are
 *		gone, and start a worker in every listed database that has none.
 *		pass rotates the order, so that with fewer slots than databases
 *		every database gets its turn.
 */
static void
launcher_scan(BackgroundWorkerHandle **handles, uint32 pass)
{
	Oid		   *dbs;
	int			ndbs = 0;
	int			cap = 16;
	int			i;
	int			k;
	int		   *to_start;
	int			nstart = 0;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	TimestampTz now;

	dbs = palloc(sizeof(Oid) * cap);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (!db->datallowconn || db->datistemplate ||
			database_is_invalid_form(db))
			continue;
		if (ndbs == cap)
		{
			cap *= 2;
			dbs = repalloc(dbs, sizeof(Oid) * cap);
		}
		dbs[ndbs++] = db->oid;
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();

	to_start = palloc(sizeof(int) * maint->nslots);
	now = GetCurrentTimestamp();
	LWLockAcquire(maint->lock, LW_EXCLUSIVE);
	for (i = 0; i < maint->nslots; i++)
	{
		MaintSlot  *s = &maint->slots[i];
		bool		listed = false;

		if (!OidIsValid(s->dbid) || s->pid != 0 || handles[i] != NULL)
			continue;
		for (k = 0; k < ndbs && !listed; k++)
			listed = (dbs[k] == s->dbid);
		if (!listed)
			memset(s, 0, sizeof(MaintSlot));
	}
	for (k = 0; k < ndbs; k++)
	{
		Oid			dbid = dbs[(k + pass) % ndbs];
		MaintSlot  *s = find_slot(dbid);

		if (s == NULL)
		{
			for (i = 0; i < maint->nslots; i++)
				if (!OidIsValid(maint->slots[i].dbid) && handles[i] == NULL)
					break;
			if (i == maint->nslots)
				continue;		/* all taken; a later pass tries again */
			s = &maint->slots[i];
			memset(s, 0, sizeof(MaintSlot));
			s->dbid = dbid;
		}
		i = s - maint->slots;
		if (s->pid == 0 && handles[i] == NULL && s->paused_until <= now)
		{
			s->restart = false;
			to_start[nstart++] = i;
		}
	}
	LWLockRelease(maint->lock);

	for (k = 0; k < nstart; k++)
	{
		i = to_start[k];
		handles[i] = start_worker(i, maint->slots[i].dbid);
	}
	pfree(to_start);
	pfree(dbs);
}

/*
 * launcher_detach
 *		on exit of the launcher: it no longer runs.
 */
static void
launcher_detach(int code, Datum arg)
{
	if (LWLockHeldByMe(maint->lock))
		LWLockRelease(maint->lock);
	LWLockAcquire(maint->lock, LW_EXCLUSIVE);
	if (maint->launcher_pid == MyProcPid)
		maint->launcher_pid = 0;
	LWLockRelease(maint->lock);
}

/*
 * billing_maintenance_launcher_main
 *		Entry point of the launcher: a pass over the databases at start
 *		and then every billing.maintenance_interval (none while it is 0);
 *		in between, workers that exited to be restarted are started again
 *		as soon as the postmaster reports their exit.
 */
void
billing_maintenance_launcher_main(Datum main_arg)
{
	BackgroundWorkerHandle **handles;
	TimestampTz last_scan = 0;
	uint32		pass = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	handles = MemoryContextAllocZero(TopMemoryContext,
									 sizeof(BackgroundWorkerHandle *) * maint->nslots);
	LWLockAcquire(maint->lock, LW_EXCLUSIVE);
	maint->launcher_pid = MyProcPid;
	LWLockRelease(maint->lock);
	before_shmem_exit(launcher_detach, (Datum) 0);

	for (;;)
	{
		long		timeout = -1;
		int			events = WL_LATCH_SET | WL_EXIT_ON_PM_DEATH;
		TimestampTz next_scan;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		launcher_reap(handles);
		if (maintenance_interval_ms > 0)
		{
			next_scan = TimestampTzPlusMilliseconds(last_scan,
													maintenance_interval_ms);
			if (last_scan == 0 || GetCurrentTimestamp() >= next_scan)
			{
				last_scan = GetCurrentTimestamp();
				launcher_scan(handles, pass++);
				next_scan = TimestampTzPlusMilliseconds(last_scan,
														maintenance_interval_ms);
			}
			timeout = interval_timeout(next_scan);
			events |= WL_TIMEOUT;
		}
		(void) WaitLatch(MyLatch, events, timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

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
	if (LWLockHeldByMe(maint->lock))
		LWLockRelease(maint->lock);
	LWLockAcquire(maint->lock, LW_EXCLUSIVE);
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
	LWLockRelease(maint->lock);
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

	LWLockAcquire(maint->lock, LW_EXCLUSIVE);
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
	LWLockRelease(maint->lock);
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
	errcb.arg = (void *) job_names[job];
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

				args[0] = CStringGetTextDatum(job_names[job]);
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
					elog(ERROR, "billing maintenance job %s returned no row", job_names[job]);
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
		if (j == JOB_FINALIZE && !auto_finalize)
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

	if (i < 0 || i >= maint->nslots)
		proc_exit(0);
	slot = &maint->slots[i];
	LWLockAcquire(maint->lock, LW_EXCLUSIVE);
	if (slot->dbid == dbid && slot->pid == 0 &&
		slot->paused_until <= GetCurrentTimestamp())
	{
		slot->pid = MyProcPid;
		slot->restart = false;
		mine = true;
	}
	LWLockRelease(maint->lock);
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
		if (maintenance_interval_ms <= 0)
			proc_exit(0);		/* off; the launcher starts one when on */

		now = GetCurrentTimestamp();
		next_run = TimestampTzPlusMilliseconds(base, maintenance_interval_ms);
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
					LWLockAcquire(maint->lock, LW_EXCLUSIVE);
					my_slot->restart = true;
					LWLockRelease(maint->lock);
					proc_exit(0);
					break;
			}
			last_check = GetCurrentTimestamp();
		}
		if (due)
		{
			base = GetCurrentTimestamp();
			run_jobs();
			next_run = TimestampTzPlusMilliseconds(base, maintenance_interval_ms);
		}

		LWLockAcquire(maint->lock, LW_EXCLUSIVE);
		my_slot->next_run = next_run;
		LWLockRelease(maint->lock);

		wake = Min(next_run, TimestampTzPlusMilliseconds(last_check, MAINT_CHECK_MS));
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 interval_timeout(wake), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/* ---------------------------------------------------------------------
 * The status function
 * ---------------------------------------------------------------------
 */

/*
 * billing_maintenance_status
 *		billing._maintenance_status(): one row per job with what the
 *		worker of the current database last did.  Without the preload, or
 *		before a worker ran here, the columns but job are NULL (runs and
 *		failures 0).
 */
Datum
billing_maintenance_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MaintSlot  *copy = palloc0(sizeof(MaintSlot));
	bool		found = false;
	int			j;

	InitMaterializedSRF(fcinfo, 0);
	if (maint != NULL)
	{
		MaintSlot  *s;

		LWLockAcquire(maint->lock, LW_SHARED);
		s = find_slot(MyDatabaseId);
		if (s != NULL)
		{
			memcpy(copy, s, sizeof(MaintSlot));
			found = true;
		}
		LWLockRelease(maint->lock);
	}

	for (j = 0; j < NUM_JOBS; j++)
	{
		Datum		values[11];
		bool		nulls[11];
		JobStatus  *js = &copy->jobs[j];

		memset(nulls, true, sizeof(nulls));
		values[0] = CStringGetTextDatum(job_names[j]);
		nulls[0] = false;
		if (found && copy->pid != 0)
		{
			values[1] = Int32GetDatum(copy->pid);
			nulls[1] = false;
			if (copy->next_run != 0)
			{
				values[2] = TimestampTzGetDatum(copy->next_run);
				nulls[2] = false;
			}
		}
		if (js->started != 0)
		{
			values[3] = TimestampTzGetDatum(js->started);
			nulls[3] = false;
			if (js->result != RESULT_RUNNING)
			{
				Interval   *iv = palloc0(sizeof(Interval));

				iv->time = js->duration_us;
				values[4] = IntervalPGetDatum(iv);
				nulls[4] = false;
			}
		}
		if (js->result != RESULT_NONE)
		{
			values[5] = CStringGetTextDatum(result_names[js->result]);
			nulls[5] = false;
		}
		if (js->has_value && js->result == RESULT_OK)
		{
			values[6] = Int64GetDatum(js->value);
			nulls[6] = false;
		}
		if (js->result == RESULT_ERROR)
		{
			values[7] = CStringGetTextDatum(js->error);
			nulls[7] = false;
		}
		if (js->last_success != 0)
		{
			values[8] = TimestampTzGetDatum(js->last_success);
			nulls[8] = false;
		}
		values[9] = Int64GetDatum(js->runs);
		nulls[9] = false;
		values[10] = Int64GetDatum(js->failures);
		nulls[10] = false;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
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
							 &auto_finalize,
							 false,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	if (!process_shared_preload_libraries_in_progress)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = maint_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = maint_shmem_startup;
	prev_ProcessUtility = ProcessUtility_hook;
	ProcessUtility_hook = maint_utility_hook;

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
