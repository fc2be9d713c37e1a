/*
 * pg_dump keeps the rows of extension tables and the values of extension
 * sequences only when they are registered with pg_extension_config_dump.
 * Every table and sequence of the parts before this one is registered
 * where it is created, except the identity sequence of charges: without
 * it a restored database would hand out charge ids that already exist.
 * (test/dump/run.sh checks that every table and sequence is registered.)
 */
SELECT pg_catalog.pg_extension_config_dump(
    pg_catalog.pg_get_serial_sequence('billing.charges', 'charge_id')::pg_catalog.regclass, '');
