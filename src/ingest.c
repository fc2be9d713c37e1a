/*
 * ingest.c  (placeholder, replaced below)
 */
#include "postgres.h"
#include "billing.h"
void
billing_ingest_init(void)
{
}
