/*
 * worker_shmem.c
 *		The maintenance worker's shared state: one slot per database with
 *		what its worker last did, and billing._maintenance_status() (the
 *		view billing.maintenance_status) that shows the current database's.
 *
 * Nothing is written to the database: no WAL, nothing for pg_dump, no table
 * for Citus to distribute or for the audit rules to cover; a restart of the
 * server starts the record afresh.
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

PG_FUNCTION_INFO_V1(billing_maintenance_status);

static const char *const result_names[] = {
	NULL, "running", "ok", "error", "skipped", "off"
};

MaintShared *billing_maint = NULL;
static int	maint_nslots = 0;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

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
	billing_maint = ShmemInitStruct("billing maintenance", maint_shmem_size(), &found);
	if (!found)
	{
		memset(billing_maint, 0, maint_shmem_size());
		billing_maint->nslots = maint_nslots;
		billing_maint->lock = &(GetNamedLWLockTranche("billing_maintenance"))->lock;
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * billing_maint_find_slot
 *		The slot of database dbid, or NULL.  Caller holds billing_maint->lock.
 */
MaintSlot *
billing_maint_find_slot(Oid dbid)
{
	int			i;

	for (i = 0; i < billing_maint->nslots; i++)
		if (billing_maint->slots[i].dbid == dbid)
			return &billing_maint->slots[i];
	return NULL;
}

/*
 * billing_maint_shmem_install
 *		From _PG_init under shared_preload_libraries: reserve the shared
 *		state when the postmaster sets up shared memory.
 */
void
billing_maint_shmem_install(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = maint_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = maint_shmem_startup;
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
	if (billing_maint != NULL)
	{
		MaintSlot  *s;

		LWLockAcquire(billing_maint->lock, LW_SHARED);
		s = billing_maint_find_slot(MyDatabaseId);
		if (s != NULL)
		{
			memcpy(copy, s, sizeof(MaintSlot));
			found = true;
		}
		LWLockRelease(billing_maint->lock);
	}

	for (j = 0; j < NUM_JOBS; j++)
	{
		Datum		values[11];
		bool		nulls[11];
		JobStatus  *js = &copy->jobs[j];

		memset(nulls, true, sizeof(nulls));
		values[0] = CStringGetTextDatum(billing_maint_job_names[j]);
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
