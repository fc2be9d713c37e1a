-- What test/citus/run.sh compares before and after the update of a 1.0
-- database (test/citus/update_10.sql): the columns 1.0 returned.
SET TimeZone = 'UTC';
SELECT account_id, invoice_id, plan, period_start, period_end, currency, total, status
  FROM billing.invoices ORDER BY 1, 2;
SELECT account_id, invoice_id, line_no, kind, meter, description, quantity, amount
  FROM billing.invoice_lines ORDER BY 1, 2, 3;
SELECT account_id, adjustment_id, invoice_id, line_kind, meter, old_quantity, new_quantity, delta,
       billed_invoice_id
  FROM billing.adjustments ORDER BY 1, 2;
SELECT a, u.meter, u.bucket_start, u.quantity, u.events
  FROM generate_series(1, 6) a, billing.usage(a, '2024-01-01', '2024-01-03', '1 day') u
 ORDER BY 1, 2, 3;
SELECT p.line_no, p.kind, p.meter, p.description, p.period_start, p.period_end, p.quantity, p.amount
  FROM billing.invoice_preview(3, '2024-01-02 05:00+00') p ORDER BY 1;
SELECT billing.remaining(4, 'api_calls', '2024-01-02 05:00+00');
SELECT account_id, action, count(*) FROM billing.audit_log GROUP BY 1, 2 ORDER BY 1, 2;
