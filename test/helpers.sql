-- test/helpers.sql: the helper functions the test suites share, in schema
-- "test" (not part of the extension).  pg_regress creates them once, in its
-- "setup" test; a pgTAP file that uses them includes this file with
-- "\ir ../helpers.sql" inside its transaction, so they go away with it.
CREATE SCHEMA IF NOT EXISTS test;
GRANT USAGE ON SCHEMA test TO PUBLIC;

-- sqlstate_of(statement): runs it and returns 'ok', or the SQLSTATE it
-- raised (for errors whose message would hold the current time, or to show
-- many errors in one table)
CREATE OR REPLACE FUNCTION test.sqlstate_of(stmt text) RETURNS text
    LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END
$$;

-- row_count_of(statement): runs it and returns the number of rows it
-- processed (for a COPY, the n of its command tag COPY n)
CREATE OR REPLACE FUNCTION test.row_count_of(stmt text) RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE stmt;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- show(account, t0, grain, meter): billing.usage() from t0 - 1 day to
-- t0 + 1 day, with bucket starts as offsets from t0
CREATE OR REPLACE FUNCTION test.show(acct bigint, t0 timestamptz, grain interval DEFAULT NULL,
                                     m text DEFAULT NULL)
    RETURNS TABLE (meter text, dimension text, bucket interval, quantity numeric, events bigint)
    LANGUAGE sql AS $$
    SELECT u.meter, u.dimension, u.bucket_start - t0, u.quantity, u.events
      FROM billing.usage(acct, t0 - interval '1 day', t0 + interval '1 day', grain, m) u
$$;
