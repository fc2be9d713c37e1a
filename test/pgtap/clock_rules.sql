-- clock_rules: the rules that are stated against the server's clock, so
-- their tests need now() (all other tests use fixed timestamps).  Every
-- time here is now() plus or minus an interval, and the transaction keeps
-- now() fixed, so the results are the same at any time of day.
--   * finalize_invoices(as_of) never finalizes a period that ends after
--     now() - billing.grace_period, whatever as_of says (SPEC 10.5);
--   * no event id is counted twice while a report with its timestamp can
--     still be accepted: purge_dedupe keeps an id until late_window + 5
--     minutes after it was claimed, whatever dedupe_window says (SPEC 10.5).
BEGIN;
SELECT plan(18);

INSERT INTO billing.meters (meter, late_window, dedupe_window) VALUES
    ('ck_short_dedupe', '3 days', '1 day'),
    ('ck_long_dedupe', '1 day', '10 days');
INSERT INTO billing.accounts (account_id) VALUES (9701), (9702);
INSERT INTO billing.plans (plan, period) VALUES ('ck_hourly', '1 hour');
INSERT INTO billing.charges (plan, meter, price) VALUES ('ck_hourly', NULL, 'flat 1');
-- hourly periods ending at now() - 90 min, now() - 30 min, now() + 30 min, ...
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES
    (9701, 'ck_hourly', now() - interval '150 minutes');

-- finalize_invoices ------------------------------------------------------------------------
SET LOCAL billing.grace_period = 0;
SET LOCAL statement_timeout = '60s';
SELECT results_eq(
    $$SELECT period_end - now() FROM billing.finalize_invoices(now() + interval '30 minutes')
       WHERE account_id = 9701 ORDER BY period_end$$,
    $$VALUES (interval '-90 minutes'), (interval '-30 minutes')$$,
    'grace 0, as_of 30 minutes ahead: only the periods that ended by now() are finalized');
SELECT is((SELECT count(*) FROM billing.finalize_invoices('infinity') WHERE account_id = 9701),
          0::bigint, 'as_of infinity finalizes nothing more (and returns at once)');
SELECT is((SELECT count(*) FROM billing.finalize_invoices(now() + interval '10 years') WHERE account_id = 9701),
          0::bigint, 'as_of 10 years ahead finalizes nothing that has not ended');
SELECT is((SELECT count(*) FROM billing.invoices WHERE account_id = 9701 AND period_end > now()),
          0::bigint, 'no invoice of a period still running or to come');
SET LOCAL billing.grace_period = '1 hour';
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES
    (9702, 'ck_hourly', now() - interval '150 minutes');
SELECT results_eq(
    $$SELECT account_id, period_end - now() FROM billing.finalize_invoices(now() + interval '5 hours')
       WHERE account_id BETWEEN 9701 AND 9702 ORDER BY 1, 2$$,
    $$VALUES (9702::bigint, interval '-90 minutes')$$,
    'grace 1 hour, as_of 5 hours ahead: only periods that ended by now() - 1 hour');
SET LOCAL billing.grace_period = '30 min';
SELECT results_eq(
    $$SELECT account_id, period_end - now() FROM billing.finalize_invoices('infinity')
       WHERE account_id BETWEEN 9701 AND 9702 ORDER BY 1, 2$$,
    $$VALUES (9702::bigint, interval '-30 minutes')$$,
    'a period ending exactly at now() - grace is finalized, the next is not');
SELECT is((SELECT count(*) FROM billing.finalize_invoices(now() - interval '10 minutes')
            WHERE account_id BETWEEN 9701 AND 9702),
          0::bigint, 'an earlier as_of still applies: nothing more before it');

-- purge_dedupe -----------------------------------------------------------------------------
-- kept(id): is the event id still in billing.dedupe_keys?
CREATE FUNCTION pg_temp.kept(id text) RETURNS boolean LANGUAGE sql AS $$
    SELECT EXISTS (SELECT 1 FROM billing.dedupe_keys WHERE account_id = 9701 AND event_id = id)
$$;
-- purge_after(x): purge_dedupe as it will run x from now.  purge_dedupe
-- never purges past now() (a future as_of would forget ids that still
-- dedupe), so the clock is moved by moving the ids' expiry back by x
-- instead, and forward again after the purge.
CREATE FUNCTION pg_temp.purge_after(x interval) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE billing.dedupe_keys SET expires_at = expires_at - x WHERE account_id = 9701;
    n := billing.purge_dedupe(now());
    UPDATE billing.dedupe_keys SET expires_at = expires_at + x WHERE account_id = 9701;
    RETURN n;
END
$$;
-- ck_short_dedupe: dedupe window 1 day, late window 3 days.  An event
-- stamped now() is accepted until now() + 3 days; its id must stay until
-- then (and 5 minutes more: a report may be stamped 5 minutes ahead).
SELECT ok(billing.record(9701, 'ck_short_dedupe', 1, now(), 'e1'), 'e1 counted');
SELECT pg_temp.purge_after(interval '2 days');
SELECT ok(pg_temp.kept('e1'),
          'two days later the dedupe window has passed, the late window has not: e1 is kept');
SELECT ok(NOT billing.record(9701, 'ck_short_dedupe', 1, now(), 'e1'),
          'so a resend of e1 is a duplicate, not counted twice');
SELECT pg_temp.purge_after(interval '3 days 5 minutes' - interval '1 microsecond');
SELECT ok(pg_temp.kept('e1'), 'kept until late_window + 5 minutes after the claim');
-- widening the late window later keeps the ids longer (the purge reads the
-- meter's windows as they are)
UPDATE billing.meters SET late_window = '5 days' WHERE meter = 'ck_short_dedupe';
SELECT pg_temp.purge_after(interval '3 days 5 minutes');
SELECT ok(pg_temp.kept('e1'), 'a late window widened after the claim keeps the id for the new window');
SELECT ok(pg_temp.purge_after(interval '5 days 5 minutes') >= 1 AND NOT pg_temp.kept('e1'),
          'then it goes');
SELECT ok(billing.record(9701, 'ck_short_dedupe', 1, now(), 'e1'), 'and e1 counts again');
SELECT is((SELECT sum(quantity) FROM billing.usage(9701, now() - interval '1 hour', now() + interval '1 hour',
                                                   meter => 'ck_short_dedupe')),
          2::numeric, 'e1 counted twice in all: once before and once after the purge');
-- a dedupe window longer than the late window applies as it is
SELECT ok(billing.record(9701, 'ck_long_dedupe', 1, now(), 'e2'), 'e2 counted');
SELECT pg_temp.purge_after(interval '10 days' - interval '1 microsecond');
SELECT ok(pg_temp.kept('e2'), 'an id is kept until its dedupe window ends ...');
SELECT pg_temp.purge_after(interval '10 days');
SELECT ok(NOT pg_temp.kept('e2'), '... when that is the longer window');

SELECT * FROM finish();
ROLLBACK;
