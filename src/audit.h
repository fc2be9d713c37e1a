/*
 * audit.h
 *		The audit chain's C interface (src/audit*.c, see audit_int.h), shared by
 *		the triggers that audit users' tables (src/audit_table.c).
 */
#ifndef BILLING_AUDIT_H
#define BILLING_AUDIT_H

#include "postgres.h"

#include "utils/jsonb.h"
#include "utils/timestamp.h"

/* register the transaction callbacks of the chain heads (from _PG_init) */
extern void billing_audit_init(void);

/* is this a pg_dump restore reloading audited rows (see audit.c) */
extern bool billing_audit_is_suspended(void);

/*
 * Append one row to an audit chain, as the extension's owner: action,
 * object and details as they go into billing.audit_log; details_text is
 * the text of details (jsonb's output) or NULL to compute it.  Returns the
 * row's seq.  The chain head row is brought up to date by
 * billing_audit_chain_flush.
 */
extern int64 billing_audit_chain_append(int64 chain, const char *action,
										const char *object, Jsonb *details,
										const char *details_text);

/* write the chain heads this transaction has moved (billing.audit_heads) */
extern void billing_audit_chain_flush(void);

/*
 * Pin the settings that change how row images are rendered (TimeZone
 * UTC, DateStyle ISO, IntervalStyle postgres) until billing_rendering_unpin;
 * returns the GUC nest level to give back, or -1 when the session's
 * settings render the same already.
 */
extern int	billing_rendering_pin(void);
extern void billing_rendering_unpin(int level);

#endif							/* BILLING_AUDIT_H */
