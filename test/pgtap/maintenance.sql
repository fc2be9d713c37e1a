-- maintenance: the settings of the maintenance worker (SPEC 10.3 and 9) and
-- the view that shows it, without depending on whether a worker runs here
-- (test/worker/run.sh tests the worker itself on a cluster of its own).
BEGIN;
SELECT plan(40);

CREATE ROLE m_reader NOLOGIN IN ROLE billing_reader;
CREATE ROLE m_writer NOLOGIN IN ROLE billing_writer;
CREATE ROLE m_nobody NOLOGIN;

-- the view ---------------------------------------------------------------------------------
SELECT has_view('billing', 'maintenance_status', 'view billing.maintenance_status');
SELECT columns_are('billing', 'maintenance_status',
                   ARRAY['job', 'worker_pid', 'next_run', 'last_run', 'last_duration', 'last_result',
                         'last_value', 'last_error', 'last_success', 'runs', 'failures'],
                   'its columns');
SELECT is(pg_get_function_result('billing._maintenance_status()'::regprocedure),
          'TABLE(job text, worker_pid integer, next_run timestamp with time zone, last_run timestamp with time zone, last_duration interval, last_result text, last_value bigint, last_error text, last_success timestamp with time zone, runs bigint, failures bigint)',
          'and their types');
SELECT results_eq($$SELECT job FROM billing.maintenance_status$$,
                  ARRAY['compact_usage', 'purge_dedupe', 'finalize_invoices'],
                  'one row per job, in the order a run takes them');
SELECT is((SELECT count(*) FROM billing.maintenance_status
            WHERE runs IS NULL OR failures IS NULL OR runs < failures
               OR (last_result = 'error') <> (last_error IS NOT NULL)),
          0::bigint, 'runs and failures are counted; an error comes with its message, only then');

SET ROLE m_reader;
SELECT lives_ok($$SELECT * FROM billing.maintenance_status$$, 'billing_reader reads the view');
RESET ROLE;
SET ROLE m_writer;
SELECT throws_ok($$SELECT * FROM billing.maintenance_status$$, '42501', NULL, 'billing_writer does not');
RESET ROLE;
SET ROLE m_nobody;
SELECT throws_ok($$SELECT * FROM billing.maintenance_status$$, '42501', NULL, 'nor does PUBLIC');
RESET ROLE;

-- on one node every job runs here (on Citus, the coordinator's worker runs them)
SELECT results_eq($$SELECT bool_and(billing._maintenance_runs_here(j))
                      FROM unnest(ARRAY['compact_usage', 'purge_dedupe', 'finalize_invoices']) j$$,
                  ARRAY[true], 'on one node the worker runs every job');

-- compaction of a pair of shards (issue 16 part 3): only shards of usage_deltas and
-- usage_days, only through compact_usage(); on one node there are none
SELECT throws_ok($$SELECT billing._compact_pair('billing.usage_deltas', 'billing.usage_days')$$,
                 '22023', NULL, '_compact_pair refuses relations other than shards of usage_deltas and usage_days');
SELECT is((SELECT count(*) FROM pg_proc p
            WHERE p.pronamespace = 'billing'::regnamespace
              AND p.proname IN ('_compact_pair', '_compact_shard', '_compact_shards',
                                '_compact_placements', '_compact_citus')
              AND has_function_privilege('m_nobody', p.oid, 'EXECUTE')), 0::bigint,
          'PUBLIC may not run the internal compaction functions');
SET ROLE m_reader;
SELECT throws_ok($$SELECT billing._compact_pair('billing.usage_deltas', 'billing.usage_days')$$,
                 '42501', NULL,
                 'billing_reader may not write the store through _compact_pair (compact_usage() calls it as the owner)');
RESET ROLE;

-- billing.maintenance_interval: a time setting in the usual units or interval syntax ---------
SELECT is(current_setting('billing.auto_finalize'), 'off', 'billing.auto_finalize is off by default');
SELECT is((SELECT boot_val FROM pg_settings WHERE name = 'billing.maintenance_interval'), '1min',
          'billing.maintenance_interval is 1min by default');
SELECT is((SELECT context FROM pg_settings WHERE name = 'billing.maintenance_interval'), 'superuser',
          'set by a superuser: postgresql.conf, ALTER SYSTEM or ALTER DATABASE');

CREATE FUNCTION pg_temp.accepts(v text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('billing.maintenance_interval', v, true);
    RETURN current_setting('billing.maintenance_interval');
END $$;
SELECT is(pg_temp.accepts(v), v, format('accepts %L', v))
  FROM unnest(ARRAY['0', '1s', '30s', '90min', '1h', '3600s', '1d', '60', '1.5s', '2 hours',
                    '1 minute', '1 minute 30 seconds', '01:30:00', 'PT90M', '1 mon', '365 days']) v;

SELECT throws_ok(format('SET billing.maintenance_interval = %L', v), '22023',
                 format('invalid value for parameter "billing.maintenance_interval": "%s"', v),
                 format('refuses %L', v))
  FROM unnest(ARRAY['often', '', '1 parsec', '-1s', '500ms', '0.5', '366 days', '2 years']) v;

SET ROLE m_reader;
SELECT throws_ok($$SET billing.maintenance_interval = '1s'$$, '42501', NULL,
                 'a role without superuser rights cannot change it');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
