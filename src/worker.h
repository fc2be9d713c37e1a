/*
 * worker.h
 *		Private header of the maintenance background worker (SPEC 10.3):
 *		the jobs, the shared state of one slot per database, and what the
 *		worker's files share.  How it works is told in worker.c.
 *
 * One job per file:
 *
 *		worker.c			the settings (billing.maintenance_interval,
 *							billing.auto_finalize), reading durations,
 *							registering it all from _PG_init
 *		worker_shmem.c		the shared state, one slot per database, and
 *							billing._maintenance_status() that shows it
 *		worker_utility.c	the ProcessUtility hook that stops a database's
 *							worker before commands that need it free
 *		worker_launcher.c	the launcher: a worker for each database
 *		worker_db.c			the worker of one database: checks, jobs, status
 */
#ifndef BILLING_WORKER_H
#define BILLING_WORKER_H

#include "postgres.h"

#include "storage/lwlock.h"
#include "utils/timestamp.h"

/* the jobs, in the order a run executes them */
typedef enum MaintJob
{
	JOB_COMPACT,
	JOB_PURGE,
	JOB_FINALIZE,
	NUM_JOBS
} MaintJob;
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

/* the names of the jobs, as billing.maintenance_status shows them */
extern const char *const billing_maint_job_names[NUM_JOBS];

/* settings (worker.c) */
extern int64 billing_maintenance_interval_ms;
extern bool billing_auto_finalize;

/* the shared state (worker_shmem.c); NULL without the preload */
extern MaintShared *billing_maint;

/* worker.c */
extern long billing_maint_interval_timeout(TimestampTz t);

/* worker_shmem.c */
extern void billing_maint_shmem_install(void);
extern MaintSlot *billing_maint_find_slot(Oid dbid);

/* worker_utility.c */
extern void billing_maint_before_utility(Node *parsetree);

/* worker_launcher.c, worker_db.c: the entry points of the processes */
PGDLLEXPORT void billing_maintenance_launcher_main(Datum main_arg);
PGDLLEXPORT void billing_maintenance_worker_main(Datum main_arg);

#endif							/* BILLING_WORKER_H */
