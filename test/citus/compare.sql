-- Every table of the billing schema, row by row, in one canonical order
-- (all columns), for test/citus/run.sh to compare between one node and the
-- Citus cluster after the same scenario (test/citus/gen_scenario.sql).
-- Each table starts with a line "== name"; run.sh compares table by table.
--
-- Left out, and why (each is the wall clock of the run, which differs
-- between any two runs, or a value computed from it):
--   charges.created_at, invoices.finalized_at, adjustments.created_at,
--   usage_corrections.corrected_at, ingest_offsets.applied_at,
--   commitments.created_at, credit_grants.created_at,
--   credit_ledger.booked_at                 now()
--   dedupe_keys.expires_at                  now() + the meter's dedupe_window
--   audit_log.at                            now()
--   audit_log.prev_hash, audit_log.hash,    hashes over rows that hold at;
--   audit_heads.hash                        both runs must pass
--                                           verify_audit_log() instead
--   the same stamps inside audit_log.details (created_at, corrected_at,
--   finalized_at, applied_at, expires_at) are masked
-- Numbered per node on Citus, so compared otherwise (the function that
-- draws the number runs on the node that holds the account, and each node
-- has its own sequence):
--   usage_corrections.correction_id         as its rank within the account
--                                           (correct_usage runs there), and
--                                           masked in audit_log (object and
--                                           details)
--   usage_days.last_seq (and the        left out: arrival numbers from
--   usage_deltas.seq                        billing.usage_seq, drawn by the
--                                           node that counts the report; they
--                                           decide only ties of last_ts, and
--                                           the scenario never sends two
--                                           reports with the same timestamp
-- usage_deltas is compared as the cells it packs, with their accounts, not
-- as its rows: how the cells of one statement are split into rows is
-- storage (per flush, per shard on Citus, group rows on one node), not
-- content.
\set ON_ERROR_STOP 1
\pset footer off
\pset tuples_only on
\pset format unaligned
\pset null '(null)'
SET TimeZone = 'UTC';
SET extra_float_digits = 0;

\echo == meters
SELECT * FROM billing.meters ORDER BY meter;
\echo == plans
SELECT * FROM billing.plans ORDER BY plan;
\echo == charges
SELECT charge_id, plan, meter, price, valid_from, description, dimension FROM billing.charges ORDER BY charge_id;
\echo == accounts
SELECT * FROM billing.accounts ORDER BY account_id;
\echo == subscriptions
SELECT * FROM billing.subscriptions ORDER BY account_id, starts_at;
\echo == metered_tables
SELECT * FROM billing.metered_tables ORDER BY tbl::text;
\echo == usage_deltas
SELECT c.account_id, c.meter, c.dimension, c.bucket_start, c.quantity, c.events, c.last_ts
  FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, NULL) c
 ORDER BY 1, 2, 3, 4, 5, 6, 7;
\echo == usage_buckets
SELECT account_id, meter, dimension, bucket_start, quantity, events, last_ts
  FROM billing.usage_buckets ORDER BY account_id, meter, bucket_start, dimension;
\echo == usage_days
SELECT d.account_id, d.meter, d.day, d.dimension, d.quantity, d.events, d.last_ts,
       c.bucket_start, c.quantity, c.events, c.last_ts
  FROM billing.usage_days d, billing._day_cells(d.day, d.cells) c
 ORDER BY d.account_id, d.meter, d.day, d.dimension, c.bucket_start;
\echo == usage_hourly
SELECT account_id, meter, dimension, bucket_start, quantity, events, last_ts
  FROM billing.usage_hourly ORDER BY account_id, meter, bucket_start, dimension;
\echo == usage_daily
SELECT account_id, meter, dimension, bucket_start, quantity, events, last_ts
  FROM billing.usage_daily ORDER BY account_id, meter, bucket_start, dimension;
\echo == unique_periods
SELECT * FROM billing.unique_periods ORDER BY account_id, meter, period_start;
\echo == unique_values
SELECT * FROM billing.unique_values ORDER BY account_id, meter, period_start, dimension;
\echo == dedupe_keys
SELECT account_id, meter, event_id FROM billing.dedupe_keys ORDER BY account_id, meter, event_id;
\echo == ingest_offsets
SELECT source, partition, last_offset FROM billing.ingest_offsets ORDER BY source, partition;
\echo == cumulative_reports
SELECT * FROM billing.cumulative_reports ORDER BY account_id, meter, bucket_start, dimension, source;
\echo == invoices
SELECT account_id, invoice_id, plan, period_start, period_end, currency, total, status
  FROM billing.invoices ORDER BY account_id, invoice_id;
\echo == invoice_lines
SELECT * FROM billing.invoice_lines ORDER BY account_id, invoice_id, line_no;
\echo == adjustments
SELECT account_id, adjustment_id, invoice_id, line_kind, meter, description, old_quantity,
       new_quantity, old_amount, new_amount, delta, reason, actor, billed_invoice_id, dimension
  FROM billing.adjustments ORDER BY account_id, adjustment_id;
\echo == usage_corrections
SELECT account_id, row_number() OVER (PARTITION BY account_id ORDER BY correction_id) AS correction_no,
       meter, dimension, bucket_start, delta, reason, actor
  FROM billing.usage_corrections ORDER BY account_id, correction_id;
\echo == commitments
SELECT account_id, commitment_id, kind, amount, starts_at, ends_at, commit_period, applies_to,
       installments, rollover_fraction, period, actor
  FROM billing.commitments ORDER BY account_id, commitment_id;
\echo == commitment_windows
SELECT * FROM billing.commitment_windows ORDER BY account_id, commitment_id, window_no;
\echo == credit_grants
SELECT account_id, grant_id, amount, effective_at, expires_at, priority, applies_to, source,
       voided_at, reason, void_reason, idempotency_key, commitment_id, window_no, rolled_from, actor
  FROM billing.credit_grants ORDER BY account_id, grant_id;
\echo == credit_ledger
SELECT account_id, seq, grant_id, kind, amount, effective_at, invoice_id, actor
  FROM billing.credit_ledger ORDER BY account_id, seq;
\echo == audit_log
SELECT account_id, seq, actor, action,
       regexp_replace(object, '^usage_correction:[0-9]+$', 'usage_correction:#') AS object,
       regexp_replace(regexp_replace(details::text,
                          '"(created_at|corrected_at|finalized_at|applied_at|expires_at)": "[^"]*"',
                          '"\1": "(wall clock)"', 'g'),
                      '"correction_id": [0-9]+', '"correction_id": #', 'g') AS details
  FROM billing.audit_log ORDER BY account_id, seq;
\echo == audit_heads
SELECT account_id, seq FROM billing.audit_heads ORDER BY account_id;
\echo == ev
SELECT * FROM ev ORDER BY account_id, meter, ts, event_id, quantity, dim;
\echo == tables compared
-- every table of the schema is listed above (a new one must be added)
SELECT string_agg(c.relname, ' ' ORDER BY c.relname)
  FROM pg_class c
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p')
   AND c.relname !~ '_[0-9]+$';
