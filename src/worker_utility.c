/*
 * worker_utility.c
 *		What the maintenance worker needs before a utility command runs.
 *
 * Commands that need a database nobody is connected to (DROP DATABASE,
 * ALTER DATABASE ... RENAME TO / SET TABLESPACE, CREATE DATABASE ...
 * TEMPLATE) wait up to 5 seconds for other sessions and then fail; a
 * worker is such a session.  billing's ProcessUtility hook (billing.c)
 * therefore stops the worker of that database first (SIGTERM, then waits
 * for it to exit) and keeps the launcher from starting one there for a few
 * seconds, by which time the command holds the database lock that makes
 * new connections wait.
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

	LWLockAcquire(billing_maint->lock, LW_EXCLUSIVE);
	slot = billing_maint_find_slot(dbid);
	if (slot != NULL)
	{
		slot->paused_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														 MAINT_PAUSE_MS);
		pid = slot->pid;
	}
	LWLockRelease(billing_maint->lock);
	if (pid == 0)
		return;

	if (kill(pid, SIGTERM) != 0)
		return;
	for (waited = 0; waited < MAINT_STOP_WAIT_MS; waited += 10)
	{
		pid_t		now_pid;

		LWLockAcquire(billing_maint->lock, LW_SHARED);
		now_pid = (slot->dbid == dbid) ? slot->pid : 0;
		LWLockRelease(billing_maint->lock);
		if (now_pid != pid)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 10, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * billing_maint_before_utility
 *		From billing's ProcessUtility hook: before DROP DATABASE, ALTER
 *		DATABASE ... RENAME TO, ALTER DATABASE ... SET TABLESPACE and CREATE
 *		DATABASE ... TEMPLATE, stop the worker of the database concerned
 *		(only with the library preloaded: otherwise there are no workers).
 */
void
billing_maint_before_utility(Node *parsetree)
{
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
	if (dbname != NULL && billing_maint != NULL)
		stop_database_worker(dbname);
}
