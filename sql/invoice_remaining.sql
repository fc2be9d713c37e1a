-- invoice_remaining: remaining(account_id, meter, at) is the number of
-- whole units of a meter that can still be used in the period holding at
-- before the usage lines (rounded, as an invoice rounds them) would exceed
-- the subscription's spend cap (SPEC §4).  NULL means unlimited (no cap, or
-- a charge that can never exceed it); 0 without a subscription.  Usage of
-- the other meters eats the same budget.
-- Accounts 5401-5499, meters and plans prefixed rm_, periods in May 2025.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';

INSERT INTO meters (meter, late_window, unit) VALUES
    ('rm_error', '100 years', 'event'),
    ('rm_span', '100 years', 'span'),
    ('rm_vol', '100 years', 'event'),
    ('rm_gb', '100 years', 'GB'),
    ('rm_other', '100 years', NULL);
INSERT INTO plans (plan) VALUES ('rm_team');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('rm_team', NULL, 'flat 26', 'Team (never capped)'),
    ('rm_team', 'rm_error', 'unit 0.003', 'Errors'),
    ('rm_team', 'rm_span', 'unit 0.5', 'Spans');
INSERT INTO accounts (account_id, name) VALUES
    (5401, 'no cap'), (5402, 'no subscription'), (5403, 'cap 10'), (5404, 'cap 10, two meters');
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (5401, 'rm_team', '2025-05-01', NULL),
    (5403, 'rm_team', '2025-05-01', 10),
    (5404, 'rm_team', '2025-05-01', 10);

-- No cap: unlimited (NULL).  No subscription: nothing can be used (0),
-- also before a subscription starts.
SELECT remaining(5401, 'rm_error', '2025-05-10') AS no_cap,
       remaining(5402, 'rm_error', '2025-05-10') AS no_subscription,
       remaining(5403, 'rm_error', '2025-04-30 23:59:59.999999') AS before_the_start;
-- A meter the plan does not bill is not limited by the cap.
SELECT remaining(5403, 'rm_other', '2025-05-10') AS meter_not_billed;

-- The cap edge, with rounding.  Errors at 0.003 under a cap of 10.00: the
-- line rounds half up, so 3334 errors = 10.002 -> 10.00 fit and 3335 =
-- 10.005 -> 10.01 do not: 3334 remain (not floor(10 / 0.003) = 3333).
SELECT remaining(5403, 'rm_error', '2025-05-10');
-- after 1000 errors, 2334 remain
SELECT record(5403, 'rm_error', 1000, '2025-05-02');
SELECT remaining(5403, 'rm_error', '2025-05-10');
-- using exactly those reaches the cap without a cap line ...
SELECT record(5403, 'rm_error', 2334, '2025-05-03');
SELECT remaining(5403, 'rm_error', '2025-05-10');
SELECT line_no, kind, meter, quantity, amount FROM invoice_preview(5403, '2025-05-10');
-- ... one more error goes over it: 10.005 -> 10.01, a cap line of -0.01
SELECT record(5403, 'rm_error', 1, '2025-05-04');
SELECT remaining(5403, 'rm_error', '2025-05-10');
SELECT line_no, kind, meter, quantity, amount FROM invoice_preview(5403, '2025-05-10');
-- The rounding mode moves the edge: from 3334 used errors (10.002) ...
-- half_even: 3335 = 10.005 -> 10.00 fits, 3336 = 10.008 -> 10.01 not: 1
-- down: 3336 = 10.008 -> 10.00 fits, 3337 = 10.011 -> 10.01 not: 2
-- up: 3334 itself is 10.01 already: 0; and up from an empty period would be
-- 3333 (9.999 -> 10.00; 3334 -> 10.01)
SELECT correct_usage(5403, 'rm_error', '2025-05-04 00:00', -1, 'remaining test: back to 3334');
SET billing.rounding = 'half_even';
SELECT remaining(5403, 'rm_error', '2025-05-10') AS half_even;
SET billing.rounding = 'down';
SELECT remaining(5403, 'rm_error', '2025-05-10') AS down;
SET billing.rounding = 'up';
SELECT remaining(5403, 'rm_error', '2025-05-10') AS up,
       remaining(5403, 'rm_error', '2025-06-10') AS up_next_period;
RESET billing.rounding;
-- the next period starts afresh
SELECT remaining(5403, 'rm_error', '2025-06-01') AS june;

-- The usage lines share one budget.  5404 used 4 spans at 0.5 = 2.00, so
-- errors may use 8.00: 2668 errors = 8.004 -> 8.00 fit, 2669 = 8.007 ->
-- 8.01 do not.  Spans may use all 10.00 less 0 for errors: 20 in all,
-- 16 remain.
SELECT record(5404, 'rm_span', 4, '2025-05-02');
SELECT remaining(5404, 'rm_error', '2025-05-10') AS errors,
       remaining(5404, 'rm_span', '2025-05-10') AS spans;
-- and the fixed fee (26) is not part of the budget
SELECT sum(amount) FILTER (WHERE kind = 'fixed') AS fixed,
       sum(amount) FILTER (WHERE kind = 'usage') AS usage
  FROM invoice_preview(5404, '2025-05-10');

-- Volume prices get cheaper past a tier bound: all units at 0.1 up to
-- 1000, at 0.05 up to 10000, then 0.01.  Under a cap of 100: 1000 units =
-- 100.00 fit, 1001 = 50.05 fit, and so on to 2000 = 100.00; 2001 = 100.05
-- do not.  From 1500 used, 500 remain.
INSERT INTO plans (plan) VALUES ('rm_volume');
INSERT INTO charges (plan, meter, price) VALUES
    ('rm_volume', 'rm_vol', 'volume 1000 @ 0.1 | 10000 @ 0.05 | inf @ 0.01');
INSERT INTO accounts (account_id, name) VALUES (5405, 'volume'), (5406, 'volume 2');
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (5405, 'rm_volume', '2025-05-01', 100);
SELECT remaining(5405, 'rm_vol', '2025-05-10');
SELECT record(5405, 'rm_vol', 1500, '2025-05-02');
SELECT remaining(5405, 'rm_vol', '2025-05-10');
-- A gap: 'volume 100 @ 1 | inf @ 0.5' under a cap of 60.  60 units = 60.00
-- fit, 61 = 61.00 do not (though 101 to 120 would fit again, at 0.5 each):
-- the answer is where one more unit first breaks the cap.  From 110 used
-- (55.00), 10 remain (120 = 60.00); from 80 used (80.00) none.
INSERT INTO meters (meter, late_window) VALUES ('rm_vol2', '100 years');
INSERT INTO charges (plan, meter, price) VALUES ('rm_volume', 'rm_vol2', 'volume 100 @ 1 | inf @ 0.5');
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (5406, 'rm_volume', '2025-05-01', 60);
SELECT remaining(5406, 'rm_vol2', '2025-05-10') AS from_0;
SELECT record(5406, 'rm_vol2', 110, '2025-05-02');
SELECT remaining(5406, 'rm_vol2', '2025-05-10') AS from_110;
SELECT correct_usage(5406, 'rm_vol2', '2025-05-02 00:00', -30, 'remaining test: 80 units');
SELECT remaining(5406, 'rm_vol2', '2025-05-10') AS from_80;

-- Other models.  Fractional usage (0.5 GB at 0.25 under a cap of 1): 4 GB
-- = 1.00 is the most, so 3 whole GB remain (3.5 GB = 0.875 -> 0.88).
-- Packages of 1000 at 2 under a cap of 9: 4 packages, 4000 units.
-- A flat fee over the first 100 units (+ 5) then 0.1 each, under a cap of
-- 6: 110 units = 6.00.  A price with a max of 5 under a cap of 10 can never
-- break it: NULL.  A minimum of 25 under a cap of 20 is over it already: 0.
INSERT INTO plans (plan) VALUES ('rm_gb'), ('rm_pkg'), ('rm_fee'), ('rm_max'), ('rm_min');
INSERT INTO charges (plan, meter, price) VALUES
    ('rm_gb', 'rm_gb', 'unit 0.25'),
    ('rm_pkg', 'rm_error', 'package 1000 @ 2'),
    ('rm_fee', 'rm_error', 'graduated 100 @ 0 | inf @ 0.1 + 5'),
    ('rm_max', 'rm_error', 'unit 1 max 5'),
    ('rm_min', 'rm_error', 'unit 0.01 min 25');
INSERT INTO accounts (account_id, name) VALUES
    (5407, 'gb'), (5408, 'package'), (5409, 'tier fee'), (5410, 'max'), (5411, 'min');
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (5407, 'rm_gb', '2025-05-01', 1),
    (5408, 'rm_pkg', '2025-05-01', 9),
    (5409, 'rm_fee', '2025-05-01', 6),
    (5410, 'rm_max', '2025-05-01', 10),
    (5411, 'rm_min', '2025-05-01', 20);
SELECT record(5407, 'rm_gb', 0.5, '2025-05-02');
SELECT remaining(5407, 'rm_gb', '2025-05-10') AS gb,
       remaining(5408, 'rm_error', '2025-05-10') AS package,
       remaining(5409, 'rm_error', '2025-05-10') AS tier_fee,
       remaining(5410, 'rm_error', '2025-05-10') AS capped_price,
       remaining(5411, 'rm_error', '2025-05-10') AS minimum_over_cap;
-- check the edges against the rating itself
SELECT rate('unit 0.25', 3.5) AS gb_3_5, rate('package 1000 @ 2', 4000) AS pkg_4000,
       rate('package 1000 @ 2', 4001) AS pkg_4001,
       rate('graduated 100 @ 0 | inf @ 0.1 + 5', 110) AS fee_110,
       rate('graduated 100 @ 0 | inf @ 0.1 + 5', 111) AS fee_111;

-- Caps of any size give the number, not NULL (1.0 gave up past 10^30 units
-- and answered "unlimited"): a cap of 10^40 at 0.003 a unit allows
-- 3333...3334 units (the last rounds down to the cap, as above); at 1 a
-- unit and a cap of 10^31, 10^31.  A price that stops growing below the
-- cap is still NULL, however long it takes to get there: a minimum of 25
-- under a cap of 100 at 10^-20 a unit gives about 10^22 (up to 100.00499...,
-- which rounds to 100.00), while the same price with a max of 50 never
-- reaches the cap.
INSERT INTO plans (plan) VALUES ('rm_big'), ('rm_one'), ('rm_tiny'), ('rm_tiny_max');
INSERT INTO charges (plan, meter, price) VALUES
    ('rm_big', 'rm_error', 'unit 0.003'),
    ('rm_one', 'rm_error', 'unit 1'),
    ('rm_tiny', 'rm_error', 'unit 0.00000000000000000001 min 25'),
    ('rm_tiny_max', 'rm_error', 'unit 0.00000000000000000001 min 25 max 50');
INSERT INTO accounts (account_id, name) VALUES
    (5412, 'cap 10^40'), (5413, 'cap 10^31'), (5414, 'tiny price'), (5415, 'tiny price, max');
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (5412, 'rm_big', '2025-05-01', 1e40),
    (5413, 'rm_one', '2025-05-01', 1e31),
    (5414, 'rm_tiny', '2025-05-01', 100),
    (5415, 'rm_tiny_max', '2025-05-01', 100);
SELECT remaining(5412, 'rm_error', '2025-05-10') AS cap_1e40,
       remaining(5413, 'rm_error', '2025-05-10') AS cap_1e31;
SELECT remaining(5414, 'rm_error', '2025-05-10') AS tiny_price,
       remaining(5415, 'rm_error', '2025-05-10') AS tiny_price_max;
-- check the edges against the rating itself
SELECT round_money(rate('unit 0.003', remaining(5412, 'rm_error', '2025-05-10')), 'USD') <= 1e40 AS fits,
       round_money(rate('unit 0.003', remaining(5412, 'rm_error', '2025-05-10') + 1), 'USD') > 1e40 AS one_more_does_not;

-- Errors: an unknown account or meter (23503), NULL arguments (22004).
SELECT remaining(5499, 'rm_error', '2025-05-10');
SELECT remaining(5401, 'rm_nope', '2025-05-10');
SELECT remaining(5401, 'rm_error', NULL);
SELECT remaining(NULL, 'rm_error', '2025-05-10');
