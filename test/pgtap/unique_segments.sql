-- unique_segments: unique meters across plan segments (issue 18 part 3 with
-- issue 17's change_plan).  A period with a plan change is rated segment by
-- segment (tiers restart): a unique meter's line of each segment counts the
-- distinct values reported in that segment, however often and in whichever
-- other segment they were reported too; a matrix charge of the second plan
-- counts its own value apart.  Random seeded reports of 40 users over two
-- months are the brute force.  Checked before compaction, after it (which
-- keeps a row from the change on, so the segment reads one row), on the
-- finalized invoices, and the months after the change.
BEGIN;
SELECT plan(8);
SELECT setseed(0.2718);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES ('us_users', 'unique', '100 years');
INSERT INTO billing.plans (plan, period) VALUES ('us_a', '1 month'), ('us_b', '1 month');
INSERT INTO billing.charges (plan, meter, dimension, price) VALUES
    ('us_a', 'us_users', NULL, 'unit 1'),
    ('us_b', 'us_users', NULL, 'graduated 3 @ 0 | inf @ 2'), ('us_b', 'us_users', 'u7', 'unit 10');
INSERT INTO billing.accounts (account_id) VALUES (9601);
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9601, 'us_a', '2025-03-01');

CREATE TEMP TABLE raw (dimension text, ts timestamptz, bucket timestamptz);
INSERT INTO raw (dimension, ts)
SELECT 'u' || (1 + floor(random() * 40))::int,
       '2025-03-01'::timestamptz + random() * interval '61 days'
  FROM generate_series(1, 400);
UPDATE raw SET bucket = date_trunc('minute', ts);
SELECT count(billing.record(9601, 'us_users', 1, r.ts, NULL, r.dimension)) AS reported FROM raw r;
SELECT billing.change_plan(9601, 'us_b', '2025-03-12 08:30');

-- the brute force: the distinct values of a line's segment (its dimension
-- alone, or for the rest line of us_b every value but u7)
CREATE FUNCTION pg_temp.brute(s timestamptz, e timestamptz, pl text, dim text) RETURNS numeric
    LANGUAGE sql AS $$
    SELECT count(DISTINCT r.dimension)::numeric FROM raw r
     WHERE r.bucket >= s AND r.bucket < e
       AND CASE WHEN dim IS NOT NULL THEN r.dimension = dim
                WHEN pl = 'us_b' THEN r.dimension <> 'u7' ELSE true END
$$;
-- the usage lines of the periods holding three moments, each against the
-- brute force of its segment (the change month has a line per segment)
CREATE FUNCTION pg_temp.lines_diff() RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM billing._period_build(ARRAY[9601, 9601, 9601]::bigint[],
                                               ARRAY['2025-03-20', '2025-04-10', '2025-05-01 00:00:01']::timestamptz[],
                                               true) b,
           LATERAL (SELECT coalesce((b.line).segment_start, b.period_start) AS s,
                           coalesce((b.line).segment_end, b.period_end) AS e) x,
           LATERAL (SELECT s.plan FROM billing.subscriptions s
                     WHERE s.account_id = 9601 AND s.starts_at <= x.s
                       AND x.s < coalesce(s.ends_at, 'infinity')) sub
     WHERE (b.line).kind = 'usage'
       AND (b.line).quantity IS DISTINCT FROM pg_temp.brute(x.s, x.e, sub.plan, (b.line).dimension)
$$;

SELECT is((SELECT count(*) FROM billing._period_build(ARRAY[9601]::bigint[], ARRAY['2025-03-20']::timestamptz[], true) b
            WHERE (b.line).kind = 'usage'),
          3::bigint, 'the change month has a usage line for us_a''s segment and two for us_b''s (u7 apart)');
SELECT is(pg_temp.lines_diff(), 0::bigint,
          'before compaction: each segment''s line counts the distinct users of its segment');
SELECT ok(billing.compact_usage() > 0, 'compacted');
SELECT is(pg_temp.lines_diff(), 0::bigint,
          'after compaction: each segment''s line counts the distinct users of its segment');
SELECT is((SELECT array_agg(p.period_start ORDER BY p.period_start) FROM billing.unique_periods p
            WHERE p.account_id = 9601),
          ARRAY['2025-03-01', '2025-03-12 08:30', '2025-04-01']::timestamptz[],
          'compaction keeps a row per billing period on the account''s grid, and one from the change on');
-- new reports on top of the compacted rows, in both segments
INSERT INTO raw (dimension, ts, bucket) VALUES
    ('late-1', '2025-03-05', '2025-03-05'), ('late-2', '2025-03-25', '2025-03-25'), ('u7', '2025-03-26', '2025-03-26');
SELECT count(billing.record(9601, 'us_users', 1, r.ts, NULL, r.dimension)) AS reported
  FROM raw r WHERE r.dimension LIKE 'late-%' OR r.ts = '2025-03-26';
SELECT is(pg_temp.lines_diff(), 0::bigint, 'compacted plus new deltas: exact in every segment');
SELECT ok((SELECT count(*) FROM billing.finalize_invoices('2025-05-01 02:00') f WHERE f.account_id = 9601) = 2,
          'finalized March and April');
SELECT is((SELECT count(*) FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
            WHERE i.account_id = 9601 AND l.kind = 'usage'
              AND l.quantity IS DISTINCT FROM pg_temp.brute(
                      coalesce(l.segment_start, i.period_start), coalesce(l.segment_end, i.period_end),
                      (SELECT s.plan FROM billing.subscriptions s
                        WHERE s.account_id = 9601 AND s.starts_at <= coalesce(l.segment_start, i.period_start)
                          AND coalesce(l.segment_start, i.period_start) < coalesce(s.ends_at, 'infinity')),
                      l.dimension)),
          0::bigint, 'every finalized line bills the distinct count of its segment');

SELECT * FROM finish();
ROLLBACK;
