/*
 * pg_dump keeps the rows of extension tables and the values of extension
 * sequences only when they are registered with pg_extension_config_dump.
 * Every table and sequence of the parts before this one is registered
 * here, in the order of release 1.0 (pg_extension.extconfig keeps it),
 * the identity sequence of charges last: without it a restored database
 * would hand out charge ids that already exist.
 * (test/dump/run.sh checks that every table and sequence is registered.)
 */

SELECT pg_catalog.pg_extension_config_dump('billing.meters', '');
SELECT pg_catalog.pg_extension_config_dump('billing.accounts', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_buckets', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_deltas', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.dedupe_keys', '');
SELECT pg_catalog.pg_extension_config_dump('billing.ingest_offsets', '');
SELECT pg_catalog.pg_extension_config_dump('billing.cumulative_reports', '');
SELECT pg_catalog.pg_extension_config_dump('billing.metered_tables', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_hourly', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_daily', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_days', '');
SELECT pg_catalog.pg_extension_config_dump('billing.plans', '');
SELECT pg_catalog.pg_extension_config_dump('billing.charges', '');
SELECT pg_catalog.pg_extension_config_dump('billing.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('billing.unique_periods', '');
SELECT pg_catalog.pg_extension_config_dump('billing.unique_values', '');
SELECT pg_catalog.pg_extension_config_dump('billing.invoices', '');
SELECT pg_catalog.pg_extension_config_dump('billing.invoice_lines', '');
SELECT pg_catalog.pg_extension_config_dump('billing.adjustments', '');
SELECT pg_catalog.pg_extension_config_dump('billing.invoice_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.adjustment_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.commitments', '');
SELECT pg_catalog.pg_extension_config_dump('billing.commitment_windows', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_grants', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_ledger', '');
SELECT pg_catalog.pg_extension_config_dump('billing.commitment_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_grant_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_corrections', '');
SELECT pg_catalog.pg_extension_config_dump('billing.correction_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('billing.audit_heads', '');

SELECT pg_catalog.pg_extension_config_dump(
    pg_catalog.pg_get_serial_sequence('billing.charges', 'charge_id')::pg_catalog.regclass, '');
