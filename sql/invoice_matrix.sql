-- Matrix charges (issue 18, SPEC 10.1): a charge with a dimension rates
-- only its meter's usage of that dimension value; the charge of the same
-- (plan, meter) with a NULL dimension rates every dimension the others do
-- not name.  Invoice and preview lines carry the dimension.
SET search_path = billing, public;
SET timezone = 'UTC';

INSERT INTO meters (meter, late_window, unit) VALUES
    ('im_span', '100 years', 'spans'), ('im_tokens', '100 years', 'tokens');
INSERT INTO accounts (account_id, name) VALUES (5601, 'Matrix Inc');
INSERT INTO plans (plan) VALUES ('im_team');
-- spans by region (eu and us apart, every other region at the rest's
-- price); tokens by model, and no rest: a model without a charge is free
INSERT INTO charges (plan, meter, dimension, price, description) VALUES
    ('im_team', 'im_span', NULL, 'unit 0.0001', 'Spans, other regions'),
    ('im_team', 'im_span', 'eu', 'unit 0.0003', 'Spans, EU'),
    ('im_team', 'im_span', 'us', 'unit 0.0002', NULL),
    ('im_team', 'im_tokens', 'large', 'graduated 1000000 @ 0 | inf @ 0.000008', NULL),
    ('im_team', 'im_tokens', 'small', 'unit 0.000001 per 1000', NULL);
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap)
VALUES (5601, 'im_team', '2025-05-01', NULL);

SELECT count(*) AS recorded FROM (
    SELECT record(5601, 'im_span', q, '2025-05-03 10:00', NULL, d)
      FROM (VALUES (100000, 'eu'), (50000, 'us'), (20000, 'ap'), (1000, '')) AS x(q, d)
    UNION ALL
    SELECT record(5601, 'im_tokens', q, '2025-05-04 12:00', NULL, d)
      FROM (VALUES (3000000, 'large'), (2500000, 'small'), (999, 'tiny')) AS x(q, d)) r;

-- one line per charge; the dimension column is last (the columns SPEC 5
-- pins come first); a charge without a description is named "meter (dimension)"
SELECT line_no, kind, meter, dimension, description, quantity, amount
  FROM invoice_preview(5601, '2025-05-20');

-- remaining takes the dimension of the units asked about: its own line's
-- price, else the rest's ('' is the dimension of reports that name none;
-- NULL: no line bills the dimension).  Under a cap of 60 the lines above
-- leave 31.90 for EU spans (6,349 more at 0.0003, the line rounded to the
-- cent), 11.90 for US spans, 4.00 for the other regions.
UPDATE subscriptions SET spend_cap = 60 WHERE account_id = 5601;
SELECT remaining(5601, 'im_span', '2025-05-20', 'eu') AS eu,
       remaining(5601, 'im_span', '2025-05-20', 'us') AS us,
       remaining(5601, 'im_span', '2025-05-20') AS other_regions,
       remaining(5601, 'im_tokens', '2025-05-20', 'tiny') AS tiny_tokens;

-- finalized lines keep the dimension
SELECT account_id, total FROM finalize_invoices('2025-06-01 02:00') WHERE account_id = 5601;
SELECT line_no, meter, dimension, quantity, amount FROM invoice_lines
 WHERE account_id = 5601 ORDER BY line_no;

-- versions are per (plan, meter, dimension): EU spans cost 0.00025 from
-- May on (retroactive), the other lines keep theirs; rerate bills the EU
-- line's difference alone
INSERT INTO charges (plan, meter, dimension, price, valid_from, description)
VALUES ('im_team', 'im_span', 'eu', 'unit 0.00025', '2025-05-01', 'Spans, EU');
SELECT meter, dimension, billed_quantity, billed_amount, correct_amount, delta
  FROM rerate('2025-05-01', '2025-06-01', 5601);

-- the next invoice carries the adjustment with its dimension
SELECT line_no, kind, meter, dimension, amount FROM invoice_preview(5601, '2025-06-10')
 WHERE kind = 'adjustment';


-- one version per (plan, meter, dimension, valid_from), NULL included
INSERT INTO charges (plan, meter, dimension, price) VALUES ('im_team', 'im_span', 'us', 'unit 1');
INSERT INTO charges (plan, meter, dimension, price) VALUES ('im_team', 'im_span', NULL, 'unit 1');
-- a fixed fee has no dimension
\set VERBOSITY terse
INSERT INTO charges (plan, meter, dimension, price) VALUES ('im_team', NULL, 'eu', 'flat 1');
\set VERBOSITY default
