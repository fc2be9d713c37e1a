/*
 * catalog.h
 *		What a backend caches about billing's own catalog: the OIDs of the
 *		relations the hot paths open, the definitions of billing.meters, and
 *		whether the tables are distributed by Citus.  All of it is dropped on
 *		a relcache invalidation of the relations concerned.  Also the scope
 *		in which work runs with the extension owner's rights.
 */
#ifndef BILLING_CATALOG_H
#define BILLING_CATALOG_H

#include "postgres.h"

#include "datatype/timestamp.h"

#include "util.h"

/* longest meter name (billing.meters has the same CHECK), with its NUL */
#define METER_NAME_LEN		64

/* a meter as defined in billing.meters */
typedef struct MeterDef
{
	char		name[METER_NAME_LEN];	/* hash key, zero padded */
	Aggregation agg;
	int64		width;			/* bucket width in microseconds */
	Interval	late_window;
	Interval	dedupe_window;
} MeterDef;

/* the search_path of work done with the extension owner's rights */
#define BILLING_SEARCH_PATH	"pg_catalog, billing, pg_temp"

/*
 * BillingOwnerScope: what billing_owner_begin changed, for
 * billing_owner_end to put back.
 */
typedef struct BillingOwnerScope
{
	bool		switched;		/* false: it ran as the owner, pinned, already */
	Oid			save_userid;
	int			save_sec_context;
	int			save_nestlevel;
} BillingOwnerScope;

extern Oid	billing_relid(const char *name);
extern bool billing_citus_table(Oid relid);
extern void billing_owner_begin(BillingOwnerScope *scope);
extern void billing_owner_end(BillingOwnerScope *scope);
extern bool billing_distributed(void);
extern bool billing_group_rows(void);
extern MeterDef *billing_lookup_meter(const char *key);
extern void billing_catalog_init(void);

#endif							/* BILLING_CATALOG_H */
