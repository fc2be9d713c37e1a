/*
 * worker_launcher.c
 *		The maintenance launcher: a static background worker connected to
 *		no database.  At start, and then every interval, it lists the
 *		databases that accept connections (templates excluded) and starts a
 *		worker in each that has none.  The postmaster starts it again after
 *		a crash (bgw_restart_time).
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

/* ---------------------------------------------------------------------
 * The launcher
 * ---------------------------------------------------------------------
 */

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

	for (i = 0; i < billing_maint->nslots; i++)
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
		LWLockAcquire(billing_maint->lock, LW_EXCLUSIVE);
		if (billing_maint->slots[i].restart && billing_maint->slots[i].pid == 0 &&
			OidIsValid(billing_maint->slots[i].dbid) &&
			billing_maint->slots[i].paused_until <= now)
		{
			billing_maint->slots[i].restart = false;
			dbid = billing_maint->slots[i].dbid;
		}
		LWLockRelease(billing_maint->lock);
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

	to_start = palloc(sizeof(int) * billing_maint->nslots);
	now = GetCurrentTimestamp();
	LWLockAcquire(billing_maint->lock, LW_EXCLUSIVE);
	for (i = 0; i < billing_maint->nslots; i++)
	{
		MaintSlot  *s = &billing_maint->slots[i];
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
		MaintSlot  *s = billing_maint_find_slot(dbid);

		if (s == NULL)
		{
			for (i = 0; i < billing_maint->nslots; i++)
				if (!OidIsValid(billing_maint->slots[i].dbid) && handles[i] == NULL)
					break;
			if (i == billing_maint->nslots)
				continue;		/* all taken; a later pass tries again */
			s = &billing_maint->slots[i];
			memset(s, 0, sizeof(MaintSlot));
			s->dbid = dbid;
		}
		i = s - billing_maint->slots;
		if (s->pid == 0 && handles[i] == NULL && s->paused_until <= now)
		{
			s->restart = false;
			to_start[nstart++] = i;
		}
	}
	LWLockRelease(billing_maint->lock);

	for (k = 0; k < nstart; k++)
	{
		i = to_start[k];
		handles[i] = start_worker(i, billing_maint->slots[i].dbid);
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
	if (LWLockHeldByMe(billing_maint->lock))
		LWLockRelease(billing_maint->lock);
	LWLockAcquire(billing_maint->lock, LW_EXCLUSIVE);
	if (billing_maint->launcher_pid == MyProcPid)
		billing_maint->launcher_pid = 0;
	LWLockRelease(billing_maint->lock);
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
									 sizeof(BackgroundWorkerHandle *) * billing_maint->nslots);
	LWLockAcquire(billing_maint->lock, LW_EXCLUSIVE);
	billing_maint->launcher_pid = MyProcPid;
	LWLockRelease(billing_maint->lock);
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
		if (billing_maintenance_interval_ms > 0)
		{
			next_scan = TimestampTzPlusMilliseconds(last_scan,
													billing_maintenance_interval_ms);
			if (last_scan == 0 || GetCurrentTimestamp() >= next_scan)
			{
				last_scan = GetCurrentTimestamp();
				launcher_scan(handles, pass++);
				next_scan = TimestampTzPlusMilliseconds(last_scan,
														billing_maintenance_interval_ms);
			}
			timeout = billing_maint_interval_timeout(next_scan);
			events |= WL_TIMEOUT;
		}
		(void) WaitLatch(MyLatch, events, timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
