-- preview_plans: a preview rates with one generic plan per session
-- (_rate_periods for at most 16 periods, _unique_counts always), set for
-- the call only; more periods (finalize, rerate) plan with the arrays'
-- sizes known.  (1) The caller's plan_cache_mode is what it was after every
-- path.  (2) The same period rated alone (a generic plan) and as each of
-- 17 copies (custom plans) gives the same lines, and the preview's lines
-- do not change over repeated calls (the cached plan).  (3) The distinct
-- count of a unique meter and the matrix lines equal a brute-force count
-- of the reports, compacted and not.  (0) The rule itself is one function,
-- _plan_cache_for, which every function that sets the mode calls.  (4)
-- invoice_preview is PL/pgSQL, its plans cached.
BEGIN;
SELECT plan(16);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('pp_sum', 'sum', '100 years'), ('pp_users', 'unique', '100 years');
INSERT INTO billing.plans (plan) VALUES ('pp');
INSERT INTO billing.charges (plan, meter, dimension, price) VALUES
    ('pp', NULL, NULL, 'flat 10'),
    ('pp', 'pp_sum', 'eu', 'unit 0.5'),
    ('pp', 'pp_sum', 'us', 'unit 0.25'),
    ('pp', 'pp_sum', NULL, 'graduated 100 @ 0 | inf @ 0.1'),
    ('pp', 'pp_users', NULL, 'graduated 5 @ 0 | inf @ 2');
INSERT INTO billing.accounts (account_id) VALUES (9901);
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
VALUES (9901, 'pp', '2025-03-01 00:00+00');

-- reports of March 2025: sums over four regions, 40 users (some twice)
CREATE TEMP TABLE pp_raw AS
SELECT 'pp_sum'::text AS meter, (ARRAY['eu', 'us', 'ap', ''])[1 + i % 4] AS dim,
       (1 + i % 13)::numeric AS q, timestamptz '2025-03-01 00:00+00' + i * interval '37 minutes' AS ts
  FROM generate_series(0, 999) i
UNION ALL
SELECT 'pp_users', 'user-' || (i % 40), 1, timestamptz '2025-03-02 00:00+00' + i * interval '5 hours'
  FROM generate_series(0, 59) i;
SELECT count(*) FROM pp_raw r, billing.record(9901, r.meter, r.q, r.ts, NULL, r.dim);

CREATE FUNCTION pg_temp.preview() RETURNS SETOF text LANGUAGE sql AS $$
    SELECT format('%s|%s|%s|%s|%s|%s', line_no, kind, meter, dimension, quantity, amount)
      FROM billing.invoice_preview(9901, '2025-03-20 00:00+00') ORDER BY line_no $$;
-- what the reports say the usage lines are
CREATE FUNCTION pg_temp.truth() RETURNS SETOF text LANGUAGE sql AS $$
    SELECT format('%s|%s|%s', 'pp_sum', d, sum(q)) FROM (
        SELECT CASE WHEN dim IN ('eu', 'us') THEN dim END AS d, q FROM pp_raw WHERE meter = 'pp_sum') x
     GROUP BY d
    UNION ALL
    SELECT format('%s|%s|%s', 'pp_users', NULL, count(DISTINCT dim)) FROM pp_raw WHERE meter = 'pp_users' $$;
CREATE FUNCTION pg_temp.usage_lines() RETURNS SETOF text LANGUAGE sql AS $$
    SELECT format('%s|%s|%s', meter, dimension, quantity)
      FROM billing.invoice_preview(9901, '2025-03-20 00:00+00') WHERE kind = 'usage' $$;

-- (0) _plan_cache_for, called from a function that declares the mode
CREATE FUNCTION pg_temp.mode_for(n integer, g boolean DEFAULT true) RETURNS text
    LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
BEGIN
    PERFORM billing._plan_cache_for(n, g);
    RETURN current_setting('plan_cache_mode');
END $$;
SET LOCAL plan_cache_mode = force_custom_plan;
SELECT is(pg_temp.mode_for(17), 'force_custom_plan', '17 periods: custom plans');
SELECT is(pg_temp.mode_for(16),
          CASE WHEN current_setting('citus.version', true) IS NULL THEN 'force_generic_plan' ELSE 'auto' END,
          '16 periods: one generic plan (without Citus)');
SELECT is(pg_temp.mode_for(1, false), 'auto', 'one period, generic plans not asked for: the caller''s mode');
SELECT is(current_setting('plan_cache_mode'), 'force_custom_plan',
          'the mode ends with the call that declared it');
-- the functions that declare the mode call _plan_cache_for, and nothing
-- else in the schema sets it
SELECT is((SELECT array_agg(p.proname::text ORDER BY p.proname) FROM pg_proc p
            WHERE p.pronamespace = 'billing'::regnamespace AND p.proname <> '_plan_cache_for'
              AND (p.prosrc ~* 'plan_cache_mode[''"]?\s*,'
                   OR ('plan_cache_mode=auto' = ANY (p.proconfig)
                       AND p.prosrc !~ 'billing\._plan_cache_for\('))),
          NULL, 'the plan cache rule is written once (_plan_cache_for)');

-- (1) the caller's plan_cache_mode survives every path
SET LOCAL plan_cache_mode = force_custom_plan;
SELECT count(*) FROM billing.invoice_preview(9901, '2025-03-20 00:00+00');
SELECT is(current_setting('plan_cache_mode'), 'force_custom_plan',
          'a preview leaves the caller''s plan_cache_mode as it was (force_custom_plan)');
SET LOCAL plan_cache_mode = auto;
SELECT count(*) FROM billing.invoice_preview(9901, '2025-03-20 00:00+00');
SELECT count(*) FROM billing._rate_periods(array_fill(9901::bigint, ARRAY[17]), array_fill('pp'::text, ARRAY[17]),
                                           array_fill('USD'::text, ARRAY[17]), array_fill(NULL::numeric, ARRAY[17]),
                                           array_fill(timestamptz '2025-03-01 00:00+00', ARRAY[17]),
                                           array_fill(timestamptz '2025-04-01 00:00+00', ARRAY[17]));
SELECT is(current_setting('plan_cache_mode'), 'auto',
          'so do a preview and a rating of 17 periods under auto');

-- (2) one period (generic plan) and 17 copies (custom plans): the same lines
CREATE TEMP TABLE pp_one AS
SELECT r.* FROM billing._rate_periods(ARRAY[9901::bigint], ARRAY['pp'], ARRAY['USD'], ARRAY[NULL::numeric],
                                      ARRAY[timestamptz '2025-03-01 00:00+00'],
                                      ARRAY[timestamptz '2025-04-01 00:00+00']) r;
CREATE TEMP TABLE pp_many AS
SELECT r.* FROM billing._rate_periods(array_fill(9901::bigint, ARRAY[17]), array_fill('pp'::text, ARRAY[17]),
                                      array_fill('USD'::text, ARRAY[17]), array_fill(NULL::numeric, ARRAY[17]),
                                      array_fill(timestamptz '2025-03-01 00:00+00', ARRAY[17]),
                                      array_fill(timestamptz '2025-04-01 00:00+00', ARRAY[17])) r;
SELECT is((SELECT count(*) FROM pp_one), 5::bigint,
          'one period: five lines (the fee; eu, us and the other regions; the users)');
SELECT is((SELECT count(*) FROM (
              SELECT i.i, o.ord, o.kind, o.meter, o.dimension, o.quantity, o.amount
                FROM pp_one o, generate_series(1, 17) i(i)
              EXCEPT ALL
              SELECT m.idx, m.ord, m.kind, m.meter, m.dimension, m.quantity, m.amount FROM pp_many m) d)
          + (SELECT count(*) FROM pp_many) - 17 * (SELECT count(*) FROM pp_one),
          0::bigint, 'seventeen copies of the period (custom plans) rate each as the one alone (a generic plan)');

-- the preview over repeated calls (its plans cached after the first)
CREATE TEMP TABLE pp_first AS SELECT pg_temp.preview() AS l;
SELECT is((SELECT count(*) FROM generate_series(1, 8) k,
                  LATERAL (SELECT pg_temp.preview() AS l EXCEPT SELECT l FROM pp_first) d),
          0::bigint, 'eight more previews give the first one''s lines');

-- (3) the lines against the reports: deltas only, compacted, and both
SELECT set_eq('SELECT * FROM pg_temp.usage_lines()', 'SELECT * FROM pg_temp.truth()',
              'usage lines (matrix and the distinct users) equal the reports, deltas only');
SELECT billing.compact_usage();
SELECT set_eq('SELECT * FROM pg_temp.usage_lines()', 'SELECT * FROM pg_temp.truth()',
              'and compacted');
CREATE TEMP TABLE pp_new (LIKE pp_raw);
INSERT INTO pp_new VALUES ('pp_users', 'user-new', 1, '2025-03-18 00:00+00'),
                          ('pp_users', 'user-3', 1, '2025-03-18 01:00+00'),
                          ('pp_sum', 'eu', 7, '2025-03-18 02:00+00');
SELECT count(*) FROM pp_new r, billing.record(9901, r.meter, r.q, r.ts, NULL, r.dim);
INSERT INTO pp_raw SELECT * FROM pp_new;
SELECT set_eq('SELECT * FROM pg_temp.usage_lines()', 'SELECT * FROM pg_temp.truth()',
              'and compacted plus new deltas (a new user, a user seen before)');
SELECT is((SELECT quantity FROM billing.invoice_preview(9901, '2025-03-20 00:00+00') WHERE meter = 'pp_users'),
          41::numeric, 'the unique meter counts 41 distinct users');

-- (4) invoice_preview is PL/pgSQL (its plan cached per session; a SQL
-- function with a SET clause is parsed and planned at every call) and
-- returns its body's lines, in their order
SELECT is((SELECT l.lanname::text FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
            WHERE p.oid = 'billing.invoice_preview(bigint,timestamptz)'::regprocedure),
          'plpgsql', 'invoice_preview is a PL/pgSQL function');
SELECT results_eq('SELECT * FROM billing.invoice_preview(9901, ''2025-03-20 00:00+00'')',
                  'SELECT * FROM billing._invoice_preview(9901, ''2025-03-20 00:00+00'')',
                  'invoice_preview returns _invoice_preview''s lines in order');

SELECT * FROM finish();
ROLLBACK;
