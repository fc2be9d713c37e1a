-- trigger_protocol: the C trigger functions called other than as the
-- triggers billing creates raise 39P01 (trigger protocol violated) with a
-- message naming the function, not an internal error XX000 (issue 13,
-- defect 7): called directly, fired at another event, at the other level,
-- without the transition table, or with the wrong number of arguments.
-- Nothing is counted, and the table's triggers made by meter_table keep
-- working afterwards.
BEGIN;
SELECT plan(16);
SET LOCAL timezone = 'UTC';

INSERT INTO billing.meters (meter, late_window) VALUES ('tp_m', '100 years');
INSERT INTO billing.accounts (account_id) VALUES (8401);
CREATE TABLE pg_temp.tp (account bigint, meter text, quantity numeric, ts timestamptz);

-- called directly
SELECT throws_ok($$SELECT billing._meter_row()$$, '39P01',
                 'function "billing._meter_row" was not called by trigger manager',
                 '_meter_row called directly');
SELECT throws_ok($$SELECT billing._meter_after_rows()$$, '39P01',
                 'function "billing._meter_after_rows" was not called by trigger manager',
                 '_meter_after_rows called directly');
SELECT throws_ok($$SELECT billing._meter_flush()$$, '39P01',
                 'function "billing._meter_flush" was not called by trigger manager',
                 '_meter_flush called directly');
SELECT throws_ok($$SELECT billing._meters_changed()$$, '39P01',
                 'function "billing._meters_changed" was not called by trigger manager',
                 '_meters_changed called directly');
SELECT throws_ok($$SELECT billing._accounts_changed()$$, '39P01',
                 'function "billing._accounts_changed" was not called by trigger manager',
                 '_accounts_changed called directly');

-- fired at the wrong event or level: each trigger alone on the table, in a
-- savepoint so that the next one starts from a clean table
CREATE FUNCTION pg_temp.fired(ddl text, dml text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text;
    msg text;
BEGIN
    BEGIN
        EXECUTE ddl;
        EXECUTE dml;
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'no error';
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    END;
    RETURN st || ': ' || msg;
END
$$;
INSERT INTO pg_temp.tp VALUES (8401, 'tp_m', 1, '2025-06-01');
SELECT is(pg_temp.fired(
    $$CREATE TRIGGER t AFTER INSERT ON pg_temp.tp FOR EACH ROW
      EXECUTE FUNCTION billing._meter_row('account', 'meter', 'quantity', 'ts', '', '', 'f')$$,
    $$INSERT INTO pg_temp.tp VALUES (8401, 'tp_m', 1, '2025-06-01')$$),
    '39P01: function "billing._meter_row" must be fired BEFORE INSERT FOR EACH ROW',
    '_meter_row fired AFTER');
SELECT is(pg_temp.fired(
    $$CREATE TRIGGER t BEFORE UPDATE ON pg_temp.tp FOR EACH ROW
      EXECUTE FUNCTION billing._meter_row('account', 'meter', 'quantity', 'ts', '', '', 'f')$$,
    $$UPDATE pg_temp.tp SET quantity = 2$$),
    '39P01: function "billing._meter_row" must be fired BEFORE INSERT FOR EACH ROW',
    '_meter_row fired by UPDATE');
SELECT is(pg_temp.fired(
    $$CREATE TRIGGER t BEFORE INSERT ON pg_temp.tp FOR EACH STATEMENT
      EXECUTE FUNCTION billing._meter_row('account', 'meter', 'quantity', 'ts', '', '', 'f')$$,
    $$INSERT INTO pg_temp.tp VALUES (8401, 'tp_m', 1, '2025-06-01')$$),
    '39P01: function "billing._meter_row" must be fired BEFORE INSERT FOR EACH ROW',
    '_meter_row fired FOR EACH STATEMENT');
SELECT is(pg_temp.fired(
    $$CREATE TRIGGER t BEFORE INSERT ON pg_temp.tp FOR EACH ROW
      EXECUTE FUNCTION billing._meter_row('account', 'meter', 'quantity', 'ts')$$,
    $$INSERT INTO pg_temp.tp VALUES (8401, 'tp_m', 1, '2025-06-01')$$),
    '39P01: trigger "t" on table "tp" must pass 7 arguments, not 4',
    '_meter_row with 4 arguments');
SELECT is(pg_temp.fired(
    $$CREATE TRIGGER t AFTER INSERT ON pg_temp.tp FOR EACH STATEMENT
      EXECUTE FUNCTION billing._meter_after_rows('account', 'meter', 'quantity', 'ts', '', '', 't')$$,
    $$INSERT INTO pg_temp.tp VALUES (8401, 'tp_m', 1, '2025-06-01')$$),
    '39P01: function "billing._meter_after_rows" must be fired AFTER INSERT FOR EACH STATEMENT with a transition table (REFERENCING NEW TABLE)',
    '_meter_after_rows without a transition table');
SELECT is(pg_temp.fired(
    $$CREATE TRIGGER t AFTER INSERT ON pg_temp.tp FOR EACH ROW
      EXECUTE FUNCTION billing._meter_after_rows('account', 'meter', 'quantity', 'ts', '', '', 't')$$,
    $$INSERT INTO pg_temp.tp VALUES (8401, 'tp_m', 1, '2025-06-01')$$),
    '39P01: function "billing._meter_after_rows" must be fired AFTER INSERT FOR EACH STATEMENT with a transition table (REFERENCING NEW TABLE)',
    '_meter_after_rows fired FOR EACH ROW');
SELECT is(pg_temp.fired(
    $$CREATE TRIGGER t BEFORE INSERT ON pg_temp.tp FOR EACH STATEMENT
      EXECUTE FUNCTION billing._meter_flush()$$,
    $$INSERT INTO pg_temp.tp VALUES (8401, 'tp_m', 1, '2025-06-01')$$),
    '39P01: function "billing._meter_flush" must be fired AFTER ... FOR EACH STATEMENT',
    '_meter_flush fired BEFORE');
SELECT is(pg_temp.fired(
    $$CREATE TRIGGER t AFTER INSERT ON pg_temp.tp FOR EACH ROW
      EXECUTE FUNCTION billing._meter_flush()$$,
    $$INSERT INTO pg_temp.tp VALUES (8401, 'tp_m', 1, '2025-06-01')$$),
    '39P01: function "billing._meter_flush" must be fired AFTER ... FOR EACH STATEMENT',
    '_meter_flush fired FOR EACH ROW');
SELECT is(pg_temp.fired(
    $$CREATE TRIGGER t AFTER UPDATE ON pg_temp.tp FOR EACH ROW
      EXECUTE FUNCTION billing._accounts_changed()$$,
    $$UPDATE pg_temp.tp SET quantity = 2$$),
    '39P01: function "billing._accounts_changed" must be fired AFTER ... FOR EACH STATEMENT',
    '_accounts_changed fired FOR EACH ROW');

-- none of it counted anything, and meter_table's triggers work as before
SELECT is_empty($$SELECT * FROM billing.usage(8401, '2025-06-01', '2025-06-02')$$,
                'nothing was counted');
SELECT billing.meter_table('pg_temp.tp', 'account', 'meter', 'quantity', 'ts', keep_rows => false);
INSERT INTO pg_temp.tp VALUES (8401, 'tp_m', 5, '2025-06-01');
SELECT is((SELECT quantity FROM billing.usage(8401, '2025-06-01', '2025-06-02', '1 day')), 5::numeric,
          'the triggers meter_table creates count as before');

SELECT * FROM finish();
ROLLBACK;
