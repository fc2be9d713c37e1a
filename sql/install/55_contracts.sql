/*
 * Contracts (SPEC section 10.2, issue 17): prepaid and promotional credits
 * with an append-only ledger, commitments (prepaid and minimum), and plan
 * changes in the middle of a period.
 *
 * What an invoice of one billing period holds, in order (built by
 * _invoice_build, shared by finalize_invoices on one node and on Citus, by
 * invoice_preview and, for the rated part, by rerate and remaining):
 *
 *   usage and fixed lines    per plan segment of the period (a plan change
 *                            splits it), fixed fees prorated by seconds
 *   cap                      the spend cap, over every segment's usage lines
 *   true_up                  minimum commitments whose window ends in it
 *   commitment               prepaid installments due in it
 *   adjustment               the account's pending adjustments
 *   credit                   one per grant drawn, in the drawdown order
 *
 * Periods and segments.  A subscription's periods are the grid
 * [anchor + n*period, anchor + (n+1)*period) (anchor: period_anchor, or
 * starts_at when NULL) cut to [starts_at, ends_at).  change_plan ends the
 * current subscription at `at` and starts the new one at `at` on the same
 * grid, so both have a piece (a segment) of the grid period holding `at`:
 * the pieces of one grid period make one invoice, from the first piece's
 * start to the last one's end.  Without plan changes a period has one
 * segment and bills exactly as in 1.0.
 *
 * Money.  Grant and commitment amounts are in the account's currency and
 * its minor unit; every line is rounded to the minor unit, so each draw is
 * exact, each credit line is its rounded draw and the ledger books that
 * same figure.
 */

-- subscriptions: the grid their periods are cut from ----------------------------------

ALTER TABLE billing.subscriptions ADD COLUMN period_anchor timestamptz NULL;
ALTER TABLE billing.subscriptions ADD CONSTRAINT subscriptions_period_anchor_check
    CHECK (pg_catalog.isfinite(period_anchor) AND period_anchor <= starts_at);
COMMENT ON COLUMN billing.subscriptions.period_anchor IS
    'Where the grid of billing periods starts (NULL: starts_at); change_plan keeps the previous subscription''s grid';

-- provenance of the new line kinds ---------------------------------------------------------

ALTER TABLE billing.invoice_lines DROP CONSTRAINT invoice_lines_kind_check;
ALTER TABLE billing.invoice_lines ADD CONSTRAINT invoice_lines_kind_check
    CHECK (kind IN ('usage', 'fixed', 'cap', 'true_up', 'commitment', 'adjustment', 'credit'));
ALTER TABLE billing.invoice_lines
    ADD COLUMN segment_start timestamptz,   -- a period with a plan change: the plan's segment
    ADD COLUMN segment_end timestamptz,
    ADD COLUMN proration numeric,           -- fixed fee of a segment: its share of the period
    ADD COLUMN commitment_id bigint,        -- commitment and true_up lines
    ADD COLUMN grant_id bigint;             -- credit lines: the grant drawn
ALTER TABLE billing.adjustments ADD COLUMN segment_start timestamptz;
COMMENT ON COLUMN billing.adjustments.segment_start IS
    'The plan segment of the corrected line (a period with a plan change); NULL: the period''s start';
-- matrix charges (issue 18): the dimension of a matrix charge's line and of
-- the adjustment correcting it (added here, after the columns above, as the
-- update adds it)
ALTER TABLE billing.invoice_lines ADD COLUMN dimension text COLLATE "C";
ALTER TABLE billing.adjustments ADD COLUMN dimension text COLLATE "C";

-- tables -----------------------------------------------------------------------------------

CREATE SEQUENCE billing.commitment_id_seq;
COMMENT ON SEQUENCE billing.commitment_id_seq IS 'Commitment numbers, unique across accounts';
CREATE TABLE billing.commitments (
    account_id         bigint NOT NULL REFERENCES billing.accounts,
    commitment_id      bigint NOT NULL DEFAULT pg_catalog.nextval('billing.commitment_id_seq'),
    kind               text NOT NULL CHECK (kind IN ('prepaid', 'minimum')),
    amount             numeric NOT NULL CHECK (amount >= 0 AND amount < 'Infinity'),
    starts_at          timestamptz NOT NULL CHECK (pg_catalog.isfinite(starts_at)),
    ends_at            timestamptz NOT NULL CHECK (pg_catalog.isfinite(ends_at)),
    commit_period      interval NULL CHECK (commit_period > interval '0'),
    applies_to         text[] COLLATE "C" NULL,
    installments       integer NOT NULL DEFAULT 1 CHECK (installments >= 1),
    rollover_fraction  numeric NOT NULL DEFAULT 0 CHECK (rollover_fraction BETWEEN 0 AND 1),
    period             interval NOT NULL,      -- the billing period it is invoiced on
    actor              text NOT NULL DEFAULT CURRENT_USER,
    created_at         timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (account_id, commitment_id),
    CHECK (ends_at > starts_at)
);
COMMENT ON TABLE billing.commitments IS
    'Commitments of accounts (add_commitment): prepaid (a credit grant per window, invoiced in installments) or minimum (a true-up when a window''s spend falls short); immutable';

CREATE TABLE billing.commitment_windows (
    account_id     bigint NOT NULL,
    commitment_id  bigint NOT NULL,
    window_no      integer NOT NULL CHECK (window_no >= 1),
    starts_at      timestamptz NOT NULL,
    ends_at        timestamptz NOT NULL,
    amount         numeric NOT NULL,
    -- prepaid: where each installment is invoiced (the start of the
    -- window's i-th period) and its amount
    installment_due      timestamptz[] NULL,
    installment_amounts  numeric[] NULL,
    PRIMARY KEY (account_id, commitment_id, window_no),
    FOREIGN KEY (account_id, commitment_id) REFERENCES billing.commitments,
    CHECK (ends_at > starts_at)
);
COMMENT ON TABLE billing.commitment_windows IS
    'The windows of each commitment (commit_period repeats the window; NULL: one window, the whole term), the amount of each and, prepaid, its installments; immutable';

CREATE SEQUENCE billing.credit_grant_id_seq;
COMMENT ON SEQUENCE billing.credit_grant_id_seq IS 'Credit grant numbers, unique across accounts';
CREATE TABLE billing.credit_grants (
    account_id       bigint NOT NULL REFERENCES billing.accounts,
    grant_id         bigint NOT NULL DEFAULT pg_catalog.nextval('billing.credit_grant_id_seq'),
    amount           numeric NOT NULL CHECK (amount >= 0 AND amount < 'Infinity'),
    effective_at     timestamptz NOT NULL CHECK (pg_catalog.isfinite(effective_at)),
    expires_at       timestamptz NULL CHECK (pg_catalog.isfinite(expires_at)),
    priority         integer NOT NULL DEFAULT 50 CHECK (priority BETWEEN 0 AND 100),
    applies_to       text[] COLLATE "C" NULL,
    source           text NOT NULL CHECK (source IN ('manual', 'commitment', 'rollover')),
    voided_at        timestamptz NULL,
    reason           text,
    void_reason      text,
    idempotency_key  text NULL,
    commitment_id    bigint NULL,        -- commitment and rollover grants
    window_no        integer NULL,       -- the commitment window it pays
    rolled_from      bigint NULL,        -- rollover grants: the grant it carries over from
    actor            text NOT NULL DEFAULT CURRENT_USER,
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (account_id, grant_id),
    FOREIGN KEY (account_id, commitment_id) REFERENCES billing.commitments,
    CHECK (expires_at > effective_at)
);
COMMENT ON TABLE billing.credit_grants IS
    'Credit grants (grant_credit, prepaid commitments, rollovers); immutable but for voided_at and void_reason, set once by void_credit';
CREATE UNIQUE INDEX credit_grants_idempotency_key
    ON billing.credit_grants (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE billing.credit_ledger (
    account_id    bigint NOT NULL,
    seq           bigint NOT NULL CHECK (seq >= 1),         -- gap-free per account
    grant_id      bigint NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('grant', 'draw', 'expire', 'void', 'rollover')),
    amount        numeric NOT NULL CHECK (CASE WHEN kind = 'grant' THEN amount >= 0 ELSE amount <= 0 END),
    effective_at  timestamptz NOT NULL,
    invoice_id    bigint NULL,              -- draws: the invoice whose credit line it is
    actor         text NOT NULL DEFAULT CURRENT_USER,
    booked_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (account_id, seq),
    FOREIGN KEY (account_id, grant_id) REFERENCES billing.credit_grants,
    FOREIGN KEY (account_id, invoice_id) REFERENCES billing.invoices
);
COMMENT ON TABLE billing.credit_ledger IS
    'Append-only ledger of credits: grant (+), draw, expire, void, rollover (-); a grant''s remaining amount is the sum of its entries';
CREATE INDEX credit_ledger_grant ON billing.credit_ledger (account_id, grant_id);

-- immutability -----------------------------------------------------------------------------

CREATE TRIGGER credit_ledger_append_only BEFORE UPDATE OR DELETE ON billing.credit_ledger
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('credit_ledger is append-only.',
        'Credit moves are new entries: void_credit, or finalize_invoices for draws and expiries.');
CREATE TRIGGER credit_ledger_no_truncate BEFORE TRUNCATE ON billing.credit_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('credit_ledger is append-only.');
CREATE TRIGGER commitments_immutable BEFORE UPDATE OR DELETE ON billing.commitments
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('Commitments never change.',
        'Add another commitment (add_commitment) or credit (grant_credit).');
CREATE TRIGGER commitments_no_truncate BEFORE TRUNCATE ON billing.commitments
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('Commitments never change.');
CREATE TRIGGER commitment_windows_immutable BEFORE UPDATE OR DELETE ON billing.commitment_windows
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('Commitments never change.');
CREATE TRIGGER commitment_windows_no_truncate BEFORE TRUNCATE ON billing.commitment_windows
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('Commitments never change.');

-- a grant is written once; void_credit only records when and why it was voided
CREATE TRIGGER credit_grants_guard BEFORE UPDATE OR DELETE ON billing.credit_grants
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change(
        'A credit grant never changes, except to record once that it was voided.',
        'Void it with void_credit, or grant another credit.',
        'voided_at', 'void_reason');
CREATE TRIGGER credit_grants_no_truncate BEFORE TRUNCATE ON billing.credit_grants
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('credit_grants never change.');

-- audit: one row per ledger entry (grant, draw, expire, void, rollover) --------------------

/*
 * _audit_credit: AFTER INSERT ROW trigger of credit_ledger.  The action is
 * the entry's kind; a grant's row carries the grant, a void's its reason.
 * Row by row on one node and on Citus alike (a finalize books a few
 * entries per account); each row is hashed into its chain at once and
 * written by the statement trigger credit_ledger_audit_flush (70_audit.sql)
 * at the end of the statement.
 */
CREATE FUNCTION billing._audit_credit() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    d jsonb := to_jsonb(NEW);
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    IF NEW.kind IN ('grant', 'void') THEN
        d := d || jsonb_build_object('credit_grant',
                       (SELECT to_jsonb(g) FROM billing.credit_grants g
                         WHERE g.account_id = NEW.account_id AND g.grant_id = NEW.grant_id));
    END IF;
    PERFORM billing._audit_append_deferred(NEW.account_id, NEW.kind, format('credit_grant:%s', NEW.grant_id),
                                           d);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._audit_credit() IS
    'Internal: writes the audit row of a credit ledger entry (action: its kind)';
CREATE TRIGGER credit_ledger_audit AFTER INSERT ON billing.credit_ledger
    FOR EACH ROW EXECUTE FUNCTION billing._audit_credit();

-- periods and plan segments ----------------------------------------------------------------

/*
 * _subscriptions_of: the subscriptions of some accounts (NULL: all), with
 * their plan's period and currency and the start of their grid; with
 * p_invoiced, also the start of the latest invoice whose period overlaps
 * them.  PL/pgSQL, so that Citus routes the query by the accounts' values
 * (the callers compose its rows in queries over functions only).  Always
 * planned with the arguments' values: a generic plan of "p_accounts IS
 * NULL OR account_id = ANY (p_accounts)" reads every subscription, and
 * compares each with every account given.
 */
CREATE FUNCTION billing._subscriptions_of(p_accounts bigint[], p_invoiced boolean DEFAULT false)
    RETURNS TABLE (account_id bigint, plan text, starts_at timestamptz, ends_at timestamptz,
                   spend_cap numeric, period interval, currency text, anchor timestamptz,
                   last_invoiced timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT s.account_id, s.plan::text, s.starts_at, s.ends_at, s.spend_cap, p.period, p.currency,
           coalesce(s.period_anchor, s.starts_at),
           CASE WHEN p_invoiced THEN
               (SELECT max(i.period_start) FROM billing.invoices i
                 WHERE i.account_id = s.account_id AND i.period_start < coalesce(s.ends_at, 'infinity')
                   AND i.period_end > s.starts_at) END
      FROM billing.subscriptions s JOIN billing.plans p ON p.plan = s.plan
     WHERE p_accounts IS NULL OR s.account_id = ANY (p_accounts);
END
$$;
COMMENT ON FUNCTION billing._subscriptions_of(bigint[], boolean) IS
    'Internal: subscriptions of some accounts (NULL: all) with period, currency, grid start and (p_invoiced) the latest overlapping invoice';

/*
 * _segments: for each (account, moment) given (i: its place in the
 * arrays), the plan segments of the billing period holding the moment, in
 * time order.  The subscription holding the moment gives the grid period
 * [grid_start, grid_end); its segments are the pieces of every
 * subscription of the account on the same grid period (same period
 * length, same grid start), each cut to its subscription's span.  The
 * invoice of the period runs from the first segment's start to the last
 * one's end; its spend cap and plan are those of the last segment.  No
 * subscription at the moment: no rows.
 */
CREATE FUNCTION billing._segments(p_accounts bigint[], p_ats timestamptz[])
    RETURNS TABLE (i integer, account_id bigint, grid_start timestamptz, grid_end timestamptz,
                   currency text, plan text, spend_cap numeric, segment_start timestamptz,
                   segment_end timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH subs AS MATERIALIZED (
        -- (Citus plans a materialized CTE on its own, routed by the accounts)
        SELECT s.account_id, s.plan::text AS plan, s.starts_at, s.ends_at, s.spend_cap, p.period,
               p.currency, coalesce(s.period_anchor, s.starts_at) AS anchor
          FROM billing.subscriptions s JOIN billing.plans p ON p.plan = s.plan
         WHERE s.account_id = ANY (p_accounts)
    ), grid AS (
        SELECT x.n::integer AS i, h.account_id, h.period, h.currency, g.gs, g.ge
          FROM unnest(p_accounts, p_ats) WITH ORDINALITY AS x(a, t, n)
               JOIN subs h ON h.account_id = x.a AND h.starts_at <= x.t
                          AND x.t < coalesce(h.ends_at, 'infinity'),
               LATERAL (SELECT billing._add_periods(h.anchor, h.period, n) AS gs,
                               billing._add_periods(h.anchor, h.period, n + 1) AS ge
                          FROM billing._period_index(h.anchor, h.period, x.t) n) g
    )
    SELECT grid.i, grid.account_id, grid.gs, grid.ge, grid.currency, s.plan, s.spend_cap,
           greatest(grid.gs, s.starts_at), least(grid.ge, s.ends_at)
      FROM grid JOIN subs s
        ON s.account_id = grid.account_id AND s.period = grid.period
       AND s.starts_at < grid.ge AND coalesce(s.ends_at, 'infinity') > grid.gs
       AND billing._add_periods(s.anchor, s.period,
               billing._period_index(s.anchor, s.period, greatest(grid.gs, s.starts_at))) = grid.gs
     ORDER BY grid.i, s.starts_at;
END
$$;
COMMENT ON FUNCTION billing._segments(bigint[], timestamptz[]) IS
    'Internal: the plan segments of the billing period holding each (account, moment)';

-- money helpers ----------------------------------------------------------------------------

-- part i of n of a total, rounded so that the parts add up to the total
CREATE FUNCTION billing._installment(total numeric, i integer, n integer, currency text)
    RETURNS numeric
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT billing.round_money(total * i / n, currency)
           - billing.round_money(total * (i - 1) / n, currency)
$$;
COMMENT ON FUNCTION billing._installment(numeric, integer, integer, text) IS
    'Internal: installment i of n of a total: round(total*i/n) - round(total*(i-1)/n), so the parts add up to the total';

/*
 * _eligible_spend: what one invoice's lines count towards a minimum
 * commitment: its usage, fixed and cap lines (after the cap, before
 * credits) for applies_to NULL; for a list of meters, the usage lines of
 * those meters, scaled down by the cap in the proportion it cut the
 * invoice's usage.  The lines are given as (kind, meter, amount), a
 * finalized invoice's lines plus the adjustments made to it since.
 */
CREATE FUNCTION billing._eligible_spend(applies_to text[], kinds text[], meters text[],
                                        amounts numeric[])
    RETURNS numeric
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT CASE
               WHEN applies_to IS NULL THEN
                   coalesce(sum(x.a) FILTER (WHERE x.k IN ('usage', 'fixed', 'cap')), 0)
               ELSE
                   coalesce(sum(x.a) FILTER (WHERE x.k = 'usage' AND x.m = ANY (applies_to)), 0)
                   * CASE WHEN coalesce(sum(x.a) FILTER (WHERE x.k = 'cap'), 0) <> 0
                               AND coalesce(sum(x.a) FILTER (WHERE x.k = 'usage'), 0) > 0
                          THEN greatest(sum(x.a) FILTER (WHERE x.k IN ('usage', 'cap')), 0)
                               / sum(x.a) FILTER (WHERE x.k = 'usage')
                          ELSE 1 END
           END
      FROM unnest(kinds, meters, amounts) AS x(k, m, a)
$$;
COMMENT ON FUNCTION billing._eligible_spend(text[], text[], text[], numeric[]) IS
    'Internal: the spend of one invoice that counts towards a minimum commitment (after the cap, before credits, restricted to applies_to)';

-- the state of a grant as drawing needs it
CREATE TYPE billing._credit_state AS (
    account_id         bigint,
    grant_id           bigint,
    priority           integer,
    effective_at       timestamptz,
    expires_at         timestamptz,
    applies_to         text[],
    source             text,
    remaining          numeric,
    rollover_fraction  numeric,       -- commitment grants: carried into the next window
    next_starts        timestamptz,   -- the next window of its commitment (NULL: none)
    next_ends          timestamptz,
    reason             text,
    last_end           timestamptz    -- the end of the account's last period when its
                                      -- subscriptions all end (NULL: one is open)
);
COMMENT ON TYPE billing._credit_state IS
    'Internal: a credit grant with its remaining amount and rollover terms, as _credit_draws takes it';

-- building invoices --------------------------------------------------------------------------

-- a commitment window as building an invoice needs it
CREATE TYPE billing._window AS (
    account_id     bigint,
    commitment_id  bigint,
    window_no      integer,
    kind           text,
    starts_at      timestamptz,
    ends_at        timestamptz,
    amount         numeric,
    applies_to     text[],
    installments   integer,
    installment_due      timestamptz[],
    installment_amounts  numeric[]
);
COMMENT ON TYPE billing._window IS
    'Internal: a commitment window with its commitment''s terms, as _invoice_build takes it';

-- a line of an invoice being built (and the ledger entries it books)
CREATE TYPE billing._invoice_line AS (
    idx               integer,        -- the period (element of the arrays given)
    ord               bigint,         -- order on the invoice
    kind              text,           -- a line kind, or expire | rollover | grant (ledger only)
    meter             text,
    description       text,
    quantity          numeric,
    amount            numeric,
    unrounded_amount  numeric,
    charge_id         bigint,
    price             billing.price,
    adjustment_id     bigint,
    commitment_id     bigint,
    grant_id          bigint,         -- negative: a rollover grant created by this build
    segment_start     timestamptz,
    segment_end       timestamptz,
    proration         numeric,
    effective_at      timestamptz,    -- ledger entries
    expires_at        timestamptz,    -- new rollover grants
    source_grant      bigint,         -- new rollover grants: the grant rolled over
    dimension         text            -- a matrix charge's line and its adjustments (issue 18)
);
COMMENT ON TYPE billing._invoice_line IS
    'Internal: a line of an invoice being built by _invoice_build, or a ledger entry it books';

/*
 * _segment_lines: the usage and fixed lines of periods rated segment by
 * segment (src/credits.c): in a period with more than one plan segment,
 * each line names its segment (plan, from, to) and carries it
 * (segment_start, segment_end), a fixed fee is prorated by the seconds of
 * its segment over those of the period (rounded once; proration: the
 * share); then each period's cap line over every segment's usage lines
 * (_cap_amount).
 */
CREATE FUNCTION billing._segment_lines(p_lines billing._invoice_line[], s_idx integer[],
                                       s_plans text[], s_starts timestamptz[],
                                       s_ends timestamptz[], p_currencies text[],
                                       p_caps numeric[], p_starts timestamptz[],
                                       p_ends timestamptz[])
    RETURNS SETOF billing._invoice_line
    AS 'MODULE_PATHNAME', 'billing_segment_lines'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing._segment_lines(billing._invoice_line[], integer[], text[], timestamptz[], timestamptz[], text[], numeric[], timestamptz[], timestamptz[]) IS
    'Internal: the lines of periods with plan segments as invoices show them (segment named, fixed fees prorated by seconds, the cap over every segment; src/credits.c)';

/*
 * _credit_draws: the drawdown (src/credits.c; pure, shared by finalize on
 * one node and on Citus and by invoice_preview).  Period i is
 * (p_accounts[i], p_starts[i], p_ends[i]); p_lines are the lines built for
 * the periods (idx: the period).  Each account's periods are paid, in time
 * order, by its grants overlapping them in the total drawdown order:
 * priority ascending, grants with applies_to before those without,
 * expires_at ascending (never last), effective_at, grant_id (a rollover
 * grant created here sorts after every existing grant, as its id will).  A
 * grant pays the positive part of the lines it applies to that earlier
 * grants left unpaid, in line order: usage, fixed, true_up and adjustment
 * lines (applies_to NULL), or the usage and adjustment lines of its meters;
 * never commitment or cap lines; at most what it has left and never more
 * than what takes the invoice's total to 0.  Each grant's draw on an
 * invoice, rounded once to the minor unit (exact: lines are rounded), is a
 * 'credit' row (negative); a grant that draws 0 gives none.  With p_book,
 * after a period's draws, every grant expired by its end with something
 * left is booked: round(f * left) of a commitment grant with a rollover
 * fraction f and a next window rolls over ('rollover' on it, 'grant' of a
 * new grant -1, -2, ... effective for the next window, which later periods
 * draw from), the rest 'expire'.
 */
CREATE FUNCTION billing._credit_draws(p_accounts bigint[], p_currencies text[],
                                      p_starts timestamptz[], p_ends timestamptz[],
                                      p_book boolean, p_lines billing._invoice_line[],
                                      p_grants billing._credit_state[])
    RETURNS SETOF billing._invoice_line
    AS 'MODULE_PATHNAME', 'billing_credit_draws'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing._credit_draws(bigint[], text[], timestamptz[], timestamptz[], boolean, billing._invoice_line[], billing._credit_state[]) IS
    'Internal: the credit lines (and, booking, the expiries and rollovers) of many periods, each account''s grants drawn in the total drawdown order (src/credits.c)';

/*
 * _invoice_build: the lines of many billing periods (element i of the
 * p_ arrays is period i; its plan segments are the elements of the s_
 * arrays whose s_idx is i, in time order), in invoice order, and the ledger
 * entries finalizing them books.  Periods of one account must be given in
 * time order; p_first marks the period that carries the account's pending
 * adjustments.  p_rated_only: only the usage, fixed and cap lines (rerate,
 * remaining).  p_book: book expiries and rollovers (finalize; the preview
 * does not).
 *
 * 1. Each segment is rated by _rate_periods from its start to its end with
 *    its plan (tiers restart at a plan change; the charge versions in force
 *    at the segment's start); with more than one segment a segment's fixed
 *    fees are prorated by its share of the period in seconds, and its lines
 *    name the segment.  The spend cap of the period caps the usage lines of
 *    every segment.
 * 2. What the accounts have: commitment windows overlapping the periods,
 *    pending adjustments, grants with something left (plain statements,
 *    routed by the accounts on Citus).  None: done.
 * 3. true_up lines (minimum windows ending in a period: the amount less the
 *    eligible spend of the finalized invoices inside the window and of the
 *    periods built here), commitment lines (each installment of a prepaid
 *    window on the period its schedule puts it in), adjustment lines (the
 *    account's first period), then the credit lines (and ledger entries) of
 *    _credit_draws.
 * Called from queries over functions only (Citus: see _subscriptions_of).
 */
CREATE FUNCTION billing._invoice_build(p_accounts bigint[], p_currencies text[], p_caps numeric[],
                                       p_starts timestamptz[], p_ends timestamptz[],
                                       p_first boolean[], s_idx integer[], s_plans text[],
                                       s_starts timestamptz[], s_ends timestamptz[],
                                       p_rated_only boolean DEFAULT false,
                                       p_book boolean DEFAULT false)
    RETURNS SETOF billing._invoice_line
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run; the plan
    -- cache mode is the default, and a level to change it on (see 2.)
    SET jit = off SET plan_cache_mode = auto AS $$
DECLARE
    accs bigint[];
    t_from timestamptz;
    t_to timestamptz;
    l billing._invoice_line[];
    wins billing._window[];
    grs billing._credit_state[];
    le_accounts bigint[];   -- with p_book: accounts whose subscriptions all end,
    le_ends timestamptz[];  -- and the end of their last period
    adjs billing._invoice_line[];   -- pending adjustments (grant_id: the account)
    sa record;
    sp record;
    has_true_ups boolean;
    has_installments boolean;
BEGIN
    IF coalesce(array_length(p_accounts, 1), 0) = 0 THEN
        RETURN;
    END IF;
    -- many periods (finalize, rerate): custom plans from here on; a few
    -- keep the caller's mode until 2. (_plan_cache_for)
    PERFORM billing._plan_cache_for(cardinality(p_accounts), false);
    -- 1. usage and fixed lines of every segment (one set-based rating), the
    -- cap.  Each period one segment (no plan change): _rate_periods rates
    -- the periods, cap included, as they are.
    IF cardinality(s_idx) = cardinality(p_accounts) THEN
        SELECT array_agg(ROW(r.idx, r.ord, r.kind, r.meter, r.description, r.quantity, r.amount,
                             r.unrounded_amount, r.charge_id, r.price, NULL, NULL, NULL, NULL, NULL,
                             NULL, NULL, NULL, NULL, r.dimension)::billing._invoice_line
                         ORDER BY r.idx, r.ord)
          INTO l
          FROM billing._rate_periods(p_accounts, s_plans, p_currencies, p_caps, s_starts, s_ends) r;
    ELSE
        -- a plan change: each segment rated on its own from its start to
        -- its end with its plan, then _segment_lines (a statement of its own:
        -- the rating's plans stay its own)
        SELECT array_agg(x.a ORDER BY y.n) AS accounts, array_agg(x.cur ORDER BY y.n) AS currencies
          INTO sa
          FROM unnest(s_idx) WITH ORDINALITY AS y(p, n)
               JOIN unnest(p_accounts, p_currencies) WITH ORDINALITY AS x(a, cur, k) ON x.k = y.p;
        l := ARRAY(SELECT ROW(r.idx, r.ord, r.kind, r.meter, r.description, r.quantity, r.amount,
                              r.unrounded_amount, r.charge_id, r.price, NULL, NULL, NULL, NULL,
                              NULL, NULL, NULL, NULL, NULL, r.dimension)::billing._invoice_line
                     FROM billing._rate_periods(sa.accounts, s_plans, sa.currencies,
                                                array_fill(NULL::numeric, ARRAY[cardinality(s_idx)]),
                                                s_starts, s_ends) r);
        l := ARRAY(SELECT x FROM billing._segment_lines(l, s_idx, s_plans, s_starts, s_ends,
                                                        p_currencies, p_caps, p_starts, p_ends) x
                    ORDER BY x.idx, x.ord);
    END IF;
    IF p_rated_only THEN
        RETURN QUERY SELECT * FROM unnest(l);
        RETURN;
    END IF;

    -- 2. what the accounts have (one statement; each subquery routed by the
    -- accounts on Citus).  From here on, for a few periods (a preview), one
    -- generic plan per statement and session: planning these statements
    -- anew costs more than running them.  (Not above: the rating's
    -- statements here and in the callees that set no mode of their own,
    -- such as _segment_lines, keep the caller's.)  See _plan_cache_for.
    PERFORM billing._plan_cache_for(cardinality(p_accounts));
    IF cardinality(p_accounts) = 1 THEN
        accs := p_accounts;
        t_from := p_starts[1];
        t_to := p_ends[1];
    ELSE
        SELECT array_agg(DISTINCT a), min(s), max(e) INTO accs, t_from, t_to
          FROM unnest(p_accounts, p_starts, p_ends) AS x(a, s, e);
    END IF;
    -- booking: the end of the last period of the accounts whose
    -- subscriptions all end (a grant expiring after it is booked by the
    -- finalize of that period); a statement of its own, so that no query
    -- joins subscriptions with tables Citus may hold apart
    IF p_book THEN
        SELECT array_agg(x.account_id), array_agg(x.last_end) INTO le_accounts, le_ends
          FROM (SELECT s.account_id,
                       CASE WHEN bool_and(s.ends_at IS NOT NULL) THEN max(s.ends_at) END AS last_end
                  FROM billing.subscriptions s
                 WHERE s.account_id = ANY (accs)
                 GROUP BY s.account_id) x;
    END IF;
    SELECT cw.wins, cw.has_true_ups, cw.has_installments,
           -- pending adjustments, as lines (the row rebuilt as
           -- billing.adjustments: on Citus a is a shard's row)
           (SELECT array_agg(ROW(NULL, a.adjustment_id, 'adjustment', a.meter,
                                 billing._adjustment_text(ROW(a.*)::billing.adjustments),
                                 a.new_quantity - a.old_quantity, a.delta, NULL, NULL, NULL,
                                 a.adjustment_id, NULL, a.account_id, NULL, NULL, NULL, NULL, NULL,
                                 NULL, a.dimension)::billing._invoice_line)
              FROM billing.adjustments a
             WHERE a.account_id = ANY (accs) AND a.billed_invoice_id IS NULL),
           -- grants with something left, effective before the last period
           -- ends, with the next window of their commitment (for a rollover)
           (SELECT array_agg(ROW(g.account_id, g.grant_id, g.priority, g.effective_at, g.expires_at,
                                 g.applies_to::text[], g.source, l.remaining,
                                 CASE WHEN g.source = 'commitment' THEN c.rollover_fraction ELSE 0 END,
                                 nw.starts_at, nw.ends_at,
                                 coalesce(g.reason, g.source),
                                 -- (an expression, not a join: the preview's
                                 -- generic plan of this query stays as it was)
                                 le_ends[array_position(le_accounts, g.account_id)])::billing._credit_state)
              FROM billing.credit_grants g
                   JOIN LATERAL (SELECT sum(x.amount) AS remaining FROM billing.credit_ledger x
                                  WHERE x.account_id = g.account_id AND x.grant_id = g.grant_id) l ON true
                   LEFT JOIN billing.commitments c
                          ON c.account_id = g.account_id AND c.commitment_id = g.commitment_id
                   LEFT JOIN billing.commitment_windows nw
                          ON nw.account_id = g.account_id AND nw.commitment_id = g.commitment_id
                         AND nw.window_no = g.window_no + 1
             WHERE g.account_id = ANY (accs) AND g.voided_at IS NULL AND g.effective_at < t_to
               AND l.remaining > 0)
      INTO wins, has_true_ups, has_installments, adjs, grs
      -- the commitment windows overlapping the periods; minimum ones ending
      -- in them (true-ups), prepaid ones (installments)
      FROM (SELECT array_agg(ROW(w.account_id, w.commitment_id, w.window_no, c.kind, w.starts_at,
                                 w.ends_at, w.amount, c.applies_to::text[], c.installments,
                                 w.installment_due, w.installment_amounts)::billing._window) AS wins,
                   coalesce(bool_or(c.kind = 'minimum' AND w.ends_at > t_from AND w.ends_at <= t_to),
                            false) AS has_true_ups,
                   coalesce(bool_or(c.kind = 'prepaid'), false) AS has_installments
              FROM billing.commitment_windows w
                   JOIN billing.commitments c
                     ON c.account_id = w.account_id AND c.commitment_id = w.commitment_id
             WHERE w.account_id = ANY (accs) AND w.starts_at < t_to AND w.ends_at > t_from) cw;
    IF wins IS NULL AND adjs IS NULL AND grs IS NULL THEN
        RETURN QUERY SELECT * FROM unnest(l);
        RETURN;
    END IF;
    -- 3. true_up lines: the minimum windows ending in a period, short of
    -- the eligible spend of the finalized invoices inside the window (each
    -- invoice's usage, fixed and cap lines plus the adjustments made to it
    -- since, billed or pending) and of the periods built here
    IF has_true_ups THEN
        SELECT array_agg(y.account_id) AS accounts, array_agg(y.commitment_id) AS commitments,
               array_agg(y.window_no) AS windows, array_agg(y.spend) AS spends
          INTO sp
          FROM (SELECT w.account_id, w.commitment_id, w.window_no,
                       sum(billing._eligible_spend(c.applies_to::text[], b.kinds, b.meters, b.amounts)) AS spend
                  FROM billing.commitment_windows w
                       JOIN billing.commitments c
                         ON c.account_id = w.account_id AND c.commitment_id = w.commitment_id
                       JOIN billing.invoices i
                         ON i.account_id = w.account_id AND i.status = 'finalized'
                        AND i.period_start >= w.starts_at AND i.period_end <= w.ends_at
                       CROSS JOIN LATERAL (
                           SELECT array_agg(z.kind) AS kinds, array_agg(z.meter) AS meters,
                                  array_agg(z.amount) AS amounts
                             FROM (SELECT x.kind, x.meter::text AS meter, x.amount
                                     FROM billing.invoice_lines x
                                    WHERE x.account_id = i.account_id AND x.invoice_id = i.invoice_id
                                      AND x.kind IN ('usage', 'fixed', 'cap')
                                   UNION ALL
                                   SELECT a.line_kind, a.meter::text, a.delta FROM billing.adjustments a
                                    WHERE a.account_id = i.account_id AND a.invoice_id = i.invoice_id) z) b
                 WHERE w.account_id = ANY (accs) AND c.kind = 'minimum'
                   AND w.ends_at > t_from AND w.ends_at <= t_to
                 GROUP BY w.account_id, w.commitment_id, w.window_no) y;
        l := l || ARRAY(
            WITH per AS (
                SELECT x.n::integer AS idx, x.a AS account_id, x.cur AS currency, x.s AS ps, x.e AS pe
                  FROM unnest(p_accounts, p_currencies, p_starts, p_ends)
                       WITH ORDINALITY AS x(a, cur, s, e, n)
            ), batch AS (
                -- the periods being built, as (kind, meter, amount) lists
                SELECT x.idx, array_agg(x.kind) AS kinds, array_agg(x.meter) AS meters,
                       array_agg(x.amount) AS amounts
                  FROM unnest(l) x GROUP BY x.idx
            ), t AS (
                SELECT per.idx, w.commitment_id, w.window_no, w.starts_at, w.ends_at, per.currency,
                       w.amount, w.amount
                       - coalesce((SELECT s.spend
                                     FROM unnest(sp.accounts, sp.commitments, sp.windows, sp.spends)
                                          AS s(account_id, commitment_id, window_no, spend)
                                    WHERE s.account_id = w.account_id AND s.commitment_id = w.commitment_id
                                      AND s.window_no = w.window_no), 0)
                       - coalesce((SELECT sum(billing._eligible_spend(w.applies_to, b.kinds, b.meters, b.amounts))
                                     FROM per p2 JOIN batch b ON b.idx = p2.idx
                                    WHERE p2.account_id = w.account_id
                                      AND p2.ps >= w.starts_at AND p2.pe <= w.ends_at), 0) AS short
                  FROM per JOIN unnest(wins) w
                         ON w.account_id = per.account_id AND w.kind = 'minimum'
                        AND w.ends_at > per.ps AND w.ends_at <= per.pe
            )
            SELECT ROW(t.idx, 2000000000 + row_number() OVER (PARTITION BY t.idx ORDER BY t.commitment_id, t.window_no),
                       'true_up', NULL,
                       format('minimum commitment %s, %s to %s: shortfall', t.commitment_id,
                              to_char(t.starts_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                              to_char(t.ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
                       -- quantity: the window's eligible spend
                       t.amount - t.short, billing.round_money(t.short, t.currency), t.short, NULL,
                       NULL, NULL, t.commitment_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                       NULL)::billing._invoice_line
              FROM t
             WHERE billing.round_money(t.short, t.currency) > 0);
    END IF;
    -- commitment lines: each installment of a prepaid window on the period
    -- its schedule puts it in
    IF has_installments THEN
        l := l || ARRAY(
            SELECT ROW(x.n, 3000000000 + row_number() OVER (PARTITION BY x.n ORDER BY w.commitment_id, w.window_no, i.j),
                       'commitment', NULL,
                       CASE WHEN w.installments = 1
                            THEN format('prepaid commitment %s, window %s', w.commitment_id, w.window_no)
                            ELSE format('prepaid commitment %s, window %s: installment %s of %s',
                                        w.commitment_id, w.window_no, i.j, w.installments) END,
                       NULL, i.amount, NULL, NULL, NULL, NULL, w.commitment_id, NULL, NULL, NULL, NULL,
                       NULL, NULL, NULL, NULL)::billing._invoice_line
              FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, n)
                   JOIN unnest(wins) w ON w.account_id = x.a AND w.kind = 'prepaid',
                   unnest(w.installment_due, w.installment_amounts) WITH ORDINALITY AS i(due, amount, j)
             WHERE i.due >= x.s AND i.due < x.e);
    END IF;
    -- adjustment lines: the account's pending adjustments, on its first period
    IF adjs IS NOT NULL THEN
        l := l || ARRAY(
            SELECT ROW(x.n, 4000000000 + row_number() OVER (PARTITION BY x.n ORDER BY a.adjustment_id),
                       'adjustment', a.meter, a.description, a.quantity, a.amount, NULL, NULL, NULL,
                       a.adjustment_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                       a.dimension)::billing._invoice_line
              FROM unnest(p_accounts, p_first) WITH ORDINALITY AS x(a, f, n)
                   JOIN unnest(adjs) a ON a.grant_id = x.a
             WHERE x.f);
    END IF;
    -- 4. the credits, after every line above (_credit_draws)
    IF grs IS NOT NULL THEN
        l := l || ARRAY(SELECT x FROM billing._credit_draws(p_accounts, p_currencies, p_starts,
                                                            p_ends, p_book, l, grs) x);
    END IF;
    IF cardinality(p_accounts) = 1 THEN
        RETURN QUERY SELECT * FROM unnest(l);     -- in order already
    ELSE
        RETURN QUERY SELECT * FROM unnest(l) x ORDER BY x.idx, x.ord;
    END IF;
END
$$;
COMMENT ON FUNCTION billing._invoice_build(bigint[], text[], numeric[], timestamptz[], timestamptz[], boolean[], integer[], text[], timestamptz[], timestamptz[], boolean, boolean) IS
    'Internal: the lines of many billing periods in invoice order (usage and fixed per plan segment, cap, true_up, commitment, adjustment, credit) and the ledger entries they book';

/*
 * _period_build: _invoice_build for the billing periods holding some
 * (account, moment) pairs (_segments), each period once; the account's
 * earliest of them carries its pending adjustments.  invoice_preview,
 * remaining and rerate read invoices through it.
 */
CREATE FUNCTION billing._period_build(p_accounts bigint[], p_ats timestamptz[],
                                      p_rated_only boolean DEFAULT false)
    RETURNS TABLE (account_id bigint, period_start timestamptz, period_end timestamptz,
                   currency text, spend_cap numeric, invoice_plan text, line billing._invoice_line)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    v_accounts bigint[];
    v_currencies text[];
    v_caps numeric[];
    v_starts timestamptz[];
    v_ends timestamptz[];
    v_firsts boolean[];
    v_plans text[];
    v_s_idx integer[];
    v_s_plans text[];
    v_s_starts timestamptz[];
    v_s_ends timestamptz[];
BEGIN
    -- the periods (k = 1..) and their segments, as _invoice_build's arrays
    SELECT array_agg(x.account_id ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS accounts,
           array_agg(x.currency ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS currencies,
           array_agg(x.cap ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS caps,
           array_agg(x.period_start ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS starts,
           array_agg(x.period_end ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS ends,
           array_agg(x.first ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS firsts,
           array_agg(x.invoice_plan ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS plans,
           array_agg(x.k ORDER BY x.k, x.segment_start) AS s_idx,
           array_agg(x.plan ORDER BY x.k, x.segment_start) AS s_plans,
           array_agg(x.segment_start ORDER BY x.k, x.segment_start) AS s_starts,
           array_agg(x.segment_end ORDER BY x.k, x.segment_start) AS s_ends
      INTO v_accounts, v_currencies, v_caps, v_starts, v_ends, v_firsts, v_plans,
           v_s_idx, v_s_plans, v_s_starts, v_s_ends
      FROM (SELECT y.*, (dense_rank() OVER (ORDER BY y.account_id, y.grid_start))::integer AS k,
                   y.grid_start = min(y.grid_start) OVER (PARTITION BY y.account_id) AS first,
                   (row_number() OVER w)::integer AS segment_no,
                   first_value(y.segment_start) OVER w AS period_start,
                   last_value(y.segment_end) OVER w AS period_end,
                   last_value(y.spend_cap) OVER w AS cap,
                   last_value(y.plan) OVER w AS invoice_plan
              FROM (SELECT DISTINCT ON (s.account_id, s.grid_start, s.segment_start) s.*
                      FROM billing._segments(p_accounts, p_ats) s
                     ORDER BY s.account_id, s.grid_start, s.segment_start) y
            WINDOW w AS (PARTITION BY y.account_id, y.grid_start ORDER BY y.segment_start
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) x;
    IF v_accounts IS NULL THEN
        RETURN;
    END IF;
    -- each line with its period, joined by the period's number: not by
    -- subscripts (v_currencies[b.idx]), which walk an array of text, or
    -- of numerics with NULLs, from its start, once per line
    RETURN QUERY
    SELECT p.a, p.s, p.e, p.cur, p.cap, p.pl, b.line
      FROM (SELECT x AS line, row_number() OVER () AS n
              FROM billing._invoice_build(v_accounts, v_currencies, v_caps, v_starts, v_ends,
                                          v_firsts, v_s_idx, v_s_plans, v_s_starts, v_s_ends,
                                          p_rated_only, false) x) b
           JOIN unnest(v_accounts, v_starts, v_ends, v_currencies, v_caps, v_plans)
                WITH ORDINALITY AS p(a, s, e, cur, cap, pl, i) ON p.i = (b.line).idx
     ORDER BY b.n;
END
$$;
COMMENT ON FUNCTION billing._period_build(bigint[], timestamptz[], boolean) IS
    'Internal: _invoice_build for the billing periods holding some (account, moment) pairs';

-- checks shared by the functions below ------------------------------------------------------

/*
 * _contract_account: the currency of an account that must exist (23503),
 * after locking its row (FOR NO KEY UPDATE): every function that books
 * credits, commitments or plan changes of an account takes this lock, as
 * finalize_invoices does, so they never interleave.
 */
CREATE FUNCTION billing._contract_account(p_account bigint) RETURNS text
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    cur text;
BEGIN
    SELECT a.currency INTO cur FROM billing.accounts a WHERE a.account_id = p_account
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % does not exist', p_account USING ERRCODE = '23503';
    END IF;
    RETURN cur;
END
$$;
COMMENT ON FUNCTION billing._contract_account(bigint) IS
    'Internal: locks an account (23503 when unknown) and returns its currency';

-- an amount of money for a credit or commitment: finite, >= 0, in minor units
CREATE FUNCTION billing._check_money(p_amount numeric, p_currency text, p_what text) RETURNS void
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF p_amount IN ('NaN', 'Infinity', '-Infinity') OR p_amount < 0 THEN
        RAISE EXCEPTION 'invalid % amount: %', p_what, p_amount
            USING ERRCODE = '22023', DETAIL = 'An amount is a finite number >= 0.';
    END IF;
    IF billing.round_money(p_amount, p_currency) <> p_amount THEN
        RAISE EXCEPTION 'invalid % amount: %', p_what, p_amount
            USING ERRCODE = '22023',
                  DETAIL = format('Amounts are in the account''s currency, %s, to its minor unit (%s decimals).',
                                  p_currency, billing.currency_exponent(p_currency));
    END IF;
END
$$;
COMMENT ON FUNCTION billing._check_money(numeric, text, text) IS
    'Internal: 22023 unless an amount is finite, >= 0 and in the currency''s minor unit';

-- applies_to: NULL, or a non-empty list of meters that exist (sorted, once each)
CREATE FUNCTION billing._check_applies_to(p_applies_to text[]) RETURNS text[]
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    missing text;
BEGIN
    IF p_applies_to IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(p_applies_to) = 0 OR array_position(p_applies_to, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'invalid applies_to: %', p_applies_to
            USING ERRCODE = '22023', DETAIL = 'applies_to is NULL (every line) or a list of meters.';
    END IF;
    SELECT m INTO missing FROM unnest(p_applies_to) m
     WHERE NOT EXISTS (SELECT 1 FROM billing.meters x WHERE x.meter = m) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', missing USING ERRCODE = '23503';
    END IF;
    RETURN ARRAY(SELECT DISTINCT m COLLATE "C" FROM unnest(p_applies_to) m ORDER BY 1);
END
$$;
COMMENT ON FUNCTION billing._check_applies_to(text[]) IS
    'Internal: NULL or a sorted list of existing meters (23503 for an unknown one, 22023 for an empty list)';

-- the next ledger seq of an account (its row is locked by the caller)
CREATE FUNCTION billing._ledger_next_seq(p_account bigint) RETURNS bigint
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN (SELECT coalesce(max(l.seq), 0) + 1 FROM billing.credit_ledger l
             WHERE l.account_id = p_account);
END
$$;
COMMENT ON FUNCTION billing._ledger_next_seq(bigint) IS
    'Internal: the next seq of an account''s credit ledger';

-- credits ------------------------------------------------------------------------------------

CREATE FUNCTION billing.grant_credit(account_id bigint, amount numeric,
                                     effective_at timestamptz DEFAULT pg_catalog.now(),
                                     expires_at timestamptz DEFAULT NULL,
                                     priority integer DEFAULT 50, applies_to text[] DEFAULT NULL,
                                     reason text DEFAULT NULL, idempotency_key text DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    cur text;
    id bigint;
BEGIN
    IF account_id IS NULL OR amount IS NULL OR effective_at IS NULL OR priority IS NULL THEN
        RAISE EXCEPTION 'grant_credit: account_id, amount, effective_at and priority must not be null'
            USING ERRCODE = '22004';
    END IF;
    cur := billing._contract_account(grant_credit.account_id);
    IF idempotency_key IS NOT NULL THEN
        SELECT g.grant_id INTO id FROM billing.credit_grants g
         WHERE g.account_id = grant_credit.account_id
           AND g.idempotency_key = grant_credit.idempotency_key;
        IF FOUND THEN
            RETURN id;        -- a repeated key: the first grant
        END IF;
    END IF;
    PERFORM billing._check_money(amount, cur, 'credit');
    IF priority NOT BETWEEN 0 AND 100 THEN
        RAISE EXCEPTION 'invalid priority: %', priority
            USING ERRCODE = '22023', DETAIL = 'A priority is 0 to 100; lower is drawn first.';
    END IF;
    IF NOT isfinite(effective_at) OR NOT coalesce(isfinite(expires_at), true)
       OR expires_at <= effective_at THEN
        RAISE EXCEPTION 'invalid credit window: effective % to %', effective_at, coalesce(expires_at::text, 'never')
            USING ERRCODE = '22023', DETAIL = 'expires_at must be finite and after effective_at (or NULL: never).';
    END IF;
    applies_to := billing._check_applies_to(applies_to);
    BEGIN
        INSERT INTO billing.credit_grants (account_id, amount, effective_at, expires_at, priority,
                                           applies_to, source, reason, idempotency_key)
        VALUES (grant_credit.account_id, billing.round_money(amount, cur), effective_at, expires_at,
                priority, applies_to, 'manual', reason, idempotency_key)
        RETURNING billing.credit_grants.grant_id INTO id;
        INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at)
        VALUES (grant_credit.account_id, billing._ledger_next_seq(grant_credit.account_id), id,
                'grant', billing.round_money(amount, cur), effective_at);
    EXCEPTION WHEN unique_violation THEN
        -- under REPEATABLE READ: the key or a ledger entry of a concurrent
        -- transaction, which this snapshot does not show
        PERFORM billing._retry_if_snapshot('grant_credit');
        RAISE;
    END;
    RETURN id;
END
$$;
COMMENT ON FUNCTION billing.grant_credit(bigint, numeric, timestamptz, timestamptz, integer, text[], text, text) IS
    'Grants an account credit (prepaid or promotional) that invoices draw from; a repeated idempotency_key returns the first grant''s id';

CREATE FUNCTION billing.void_credit(account_id bigint, grant_id bigint, reason text,
                                    at timestamptz DEFAULT pg_catalog.now())
    RETURNS numeric
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    g billing.credit_grants;
    left_over numeric;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'voiding a credit needs a reason' USING ERRCODE = '22004';
    END IF;
    IF account_id IS NULL OR grant_id IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'void_credit: account_id, grant_id and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT isfinite(at) THEN
        RAISE EXCEPTION 'void_credit: at must be finite' USING ERRCODE = '22023';
    END IF;
    PERFORM billing._contract_account(void_credit.account_id);
    SELECT * INTO g FROM billing.credit_grants x
     WHERE x.account_id = void_credit.account_id AND x.grant_id = void_credit.grant_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'credit grant % of account % does not exist', void_credit.grant_id,
              void_credit.account_id USING ERRCODE = '23503';
    END IF;
    IF g.voided_at IS NOT NULL THEN
        RETURN 0;             -- voided before: nothing left to forfeit
    END IF;
    -- what is left at `at` is known once every period of the grant's window
    -- that ends by then is finalized: those periods draw from it first
    IF EXISTS (SELECT 1 FROM billing._due_periods(void_credit.at, ARRAY[g.account_id]) d
                WHERE d.period_end > g.effective_at
                  AND (g.expires_at IS NULL OR d.period_start < g.expires_at)) THEN
        RAISE EXCEPTION 'credit grant % of account % would still pay periods that end by %',
              g.grant_id, g.account_id, void_credit.at
            USING ERRCODE = '55000',
                  DETAIL = 'void_credit forfeits what is left of a grant at "at"; periods of its window that end by then and are not finalized yet draw from it first.',
                  HINT = 'Finalize those invoices first (finalize_invoices), or void the grant at an earlier time.';
    END IF;
    SELECT coalesce(sum(l.amount), 0) INTO left_over FROM billing.credit_ledger l
     WHERE l.account_id = g.account_id AND l.grant_id = g.grant_id;
    BEGIN
        UPDATE billing.credit_grants x SET voided_at = void_credit.at, void_reason = void_credit.reason
         WHERE x.account_id = g.account_id AND x.grant_id = g.grant_id;
        INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at)
        VALUES (g.account_id, billing._ledger_next_seq(g.account_id), g.grant_id, 'void', -left_over,
                greatest(at, g.effective_at));
    EXCEPTION WHEN unique_violation THEN
        -- under REPEATABLE READ: a concurrent finalize's ledger entries (its
        -- draws of this grant too), which this snapshot does not show
        PERFORM billing._retry_if_snapshot('void_credit');
        RAISE;
    END;
    RETURN left_over;
END
$$;
COMMENT ON FUNCTION billing.void_credit(bigint, bigint, text, timestamptz) IS
    'Voids a credit grant: what is left of it is forfeited (returned) and booked as void; what was used stays used';

/*
 * credit_balance: every grant of the account effective at `at`, expired
 * and voided ones too, in the drawdown order, with the ledger's entries
 * effective by `at` summed by kind.
 */
CREATE FUNCTION billing.credit_balance(account_id bigint, at timestamptz DEFAULT pg_catalog.now())
    RETURNS TABLE (grant_id bigint, priority integer, effective_at timestamptz,
                   expires_at timestamptz, granted numeric, used numeric, expired numeric,
                   voided numeric, rolled_over numeric, remaining numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
#variable_conflict use_column
BEGIN
    IF credit_balance.account_id IS NULL OR credit_balance.at IS NULL THEN
        RAISE EXCEPTION 'credit_balance: account_id and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = credit_balance.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', credit_balance.account_id USING ERRCODE = '23503';
    END IF;
    RETURN QUERY
    SELECT g.grant_id, g.priority, g.effective_at, g.expires_at,
           coalesce(sum(l.amount) FILTER (WHERE l.kind = 'grant'), 0),
           coalesce(-sum(l.amount) FILTER (WHERE l.kind = 'draw'), 0),
           coalesce(-sum(l.amount) FILTER (WHERE l.kind = 'expire'), 0),
           coalesce(-sum(l.amount) FILTER (WHERE l.kind = 'void'), 0),
           coalesce(-sum(l.amount) FILTER (WHERE l.kind = 'rollover'), 0),
           coalesce(sum(l.amount), 0)
      FROM billing.credit_grants g
           LEFT JOIN billing.credit_ledger l
                  ON l.account_id = g.account_id AND l.grant_id = g.grant_id
                 AND l.effective_at <= credit_balance.at
     WHERE g.account_id = credit_balance.account_id AND g.effective_at <= credit_balance.at
     GROUP BY g.grant_id, g.priority, g.effective_at, g.expires_at, g.applies_to
     ORDER BY g.priority, g.applies_to IS NULL, g.expires_at ASC NULLS LAST, g.effective_at,
              g.grant_id;
END
$$;
COMMENT ON FUNCTION billing.credit_balance(bigint, timestamptz) IS
    'The grants of an account effective at a moment, in drawdown order, with granted = used + expired + voided + rolled_over + remaining as booked by then';

-- commitments ----------------------------------------------------------------------------------

/*
 * _period_boundary: is ts a billing period boundary of the account: a
 * point of the period grid of a subscription that holds it (the start of
 * the first one is; a plan change inside a period is not: the period runs
 * on), or the end of its last subscription, where its last period is cut?
 * Returns the period length of that subscription (NULL: not a boundary).
 */
CREATE FUNCTION billing._period_boundary(p_account bigint, p_ts timestamptz) RETURNS interval
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN (SELECT s.period
              FROM (SELECT x.*, bool_or(x.starts_at = p_ts) OVER () AS one_starts_there
                      FROM billing._subscriptions_of(ARRAY[p_account], false) x) s
             WHERE (s.starts_at <= p_ts AND p_ts <= coalesce(s.ends_at, 'infinity')
                    AND billing._add_periods(s.anchor, s.period,
                                             billing._period_index(s.anchor, s.period, p_ts)) = p_ts)
                OR (p_ts = s.ends_at AND NOT s.one_starts_there)
             ORDER BY s.starts_at DESC LIMIT 1);
END
$$;
COMMENT ON FUNCTION billing._period_boundary(bigint, timestamptz) IS
    'Internal: the period length of the subscription a moment is a period boundary of (NULL: not a boundary)';

CREATE FUNCTION billing.add_commitment(account_id bigint, kind text, amount numeric,
                                       starts_at timestamptz, ends_at timestamptz,
                                       commit_period interval DEFAULT NULL,
                                       applies_to text[] DEFAULT NULL,
                                       installments integer DEFAULT 1,
                                       rollover_fraction numeric DEFAULT 0)
    RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    cur text;
    per interval;
    id bigint;
    n_windows integer := 0;
    ws timestamptz;
    we timestamptz;
    w integer;
    w_amount numeric;
    gid bigint;
    bad timestamptz;
    details jsonb;
    anc timestamptz;    -- the account's period grid starts here
BEGIN
    IF account_id IS NULL OR kind IS NULL OR amount IS NULL OR starts_at IS NULL OR ends_at IS NULL
       OR installments IS NULL OR rollover_fraction IS NULL THEN
        RAISE EXCEPTION 'add_commitment: only commit_period and applies_to may be null'
            USING ERRCODE = '22004';
    END IF;
    cur := billing._contract_account(add_commitment.account_id);
    IF kind NOT IN ('prepaid', 'minimum') THEN
        RAISE EXCEPTION 'unknown commitment kind "%"', kind
            USING ERRCODE = '22023', DETAIL = 'A commitment is prepaid or minimum.';
    END IF;
    PERFORM billing._check_money(amount, cur, 'commitment');
    IF NOT isfinite(starts_at) OR NOT isfinite(ends_at) OR ends_at <= starts_at THEN
        RAISE EXCEPTION 'invalid commitment term: % to %', starts_at, ends_at
            USING ERRCODE = '22023', DETAIL = 'ends_at must be finite and after starts_at.';
    END IF;
    IF commit_period <= interval '0' THEN
        RAISE EXCEPTION 'invalid commit_period: %', commit_period USING ERRCODE = '22023';
    END IF;
    IF installments < 1 THEN
        RAISE EXCEPTION 'invalid installments: %', installments
            USING ERRCODE = '22023', DETAIL = 'A window is invoiced in 1 or more installments.';
    END IF;
    IF rollover_fraction = 'NaN' OR rollover_fraction NOT BETWEEN 0 AND 1 THEN
        RAISE EXCEPTION 'invalid rollover_fraction: %', rollover_fraction
            USING ERRCODE = '22023', DETAIL = 'A rollover fraction is 0 to 1.';
    END IF;
    applies_to := billing._check_applies_to(applies_to);
    IF EXISTS (SELECT 1 FROM billing.invoices i
                WHERE i.account_id = add_commitment.account_id AND i.period_end > starts_at) THEN
        RAISE EXCEPTION 'commitment of account % starts at %, inside an already finalized period',
              add_commitment.account_id, starts_at
            USING ERRCODE = '55000', HINT = 'Start it at or after the end of the last finalized period.';
    END IF;

    -- the windows: [starts_at + k * commit_period, ...) cut at ends_at, each
    -- on the account's period boundaries; its periods and installments on
    -- the account's grid (anc: a month-end anchor keeps month ends)
    per := billing._period_boundary(add_commitment.account_id, starts_at);
    SELECT s.anchor INTO anc FROM billing._subscriptions_of(ARRAY[add_commitment.account_id], false) s
     WHERE s.starts_at <= add_commitment.starts_at ORDER BY s.starts_at DESC LIMIT 1;
    LOOP
        ws := CASE WHEN commit_period IS NULL THEN starts_at
                   ELSE billing._add_periods(starts_at, commit_period, n_windows) END;
        EXIT WHEN ws >= ends_at;
        we := CASE WHEN commit_period IS NULL THEN ends_at
                   ELSE least(billing._add_periods(starts_at, commit_period, n_windows + 1), ends_at) END;
        IF per IS NULL OR billing._period_boundary(add_commitment.account_id, ws) IS DISTINCT FROM per
           OR billing._period_boundary(add_commitment.account_id, we) IS DISTINCT FROM per THEN
            bad := CASE WHEN per IS NULL OR billing._period_boundary(add_commitment.account_id, ws)
                                             IS DISTINCT FROM per THEN ws ELSE we END;
            RAISE EXCEPTION 'commitment window boundary % is not a billing period boundary of account %',
                  bad, add_commitment.account_id
                USING ERRCODE = '22023',
                      DETAIL = 'Windows start and end where the account''s subscription periods do.';
        END IF;
        IF kind = 'prepaid' AND installments > billing._period_index(anc, per, we - interval '1 microsecond')
                                               - billing._period_index(anc, per, ws) + 1 THEN
            RAISE EXCEPTION 'commitment window % to % has % billing periods, fewer than % installments',
                  ws, we, billing._period_index(anc, per, we - interval '1 microsecond')
                          - billing._period_index(anc, per, ws) + 1, installments
                USING ERRCODE = '22023', DETAIL = 'Each installment is invoiced on a period of its window.';
        END IF;
        n_windows := n_windows + 1;
        EXIT WHEN commit_period IS NULL;
    END LOOP;

    INSERT INTO billing.commitments (account_id, kind, amount, starts_at, ends_at, commit_period,
                                     applies_to, installments, rollover_fraction, period)
    VALUES (add_commitment.account_id, kind, amount, starts_at, ends_at, commit_period, applies_to,
            installments, rollover_fraction, per)
    RETURNING billing.commitments.commitment_id INTO id;
    FOR w IN 1 .. n_windows LOOP
        ws := CASE WHEN commit_period IS NULL THEN starts_at
                   ELSE billing._add_periods(starts_at, commit_period, w - 1) END;
        we := CASE WHEN commit_period IS NULL THEN ends_at
                   ELSE least(billing._add_periods(starts_at, commit_period, w), ends_at) END;
        w_amount := billing._installment(amount, w, n_windows, cur);
        INSERT INTO billing.commitment_windows (account_id, commitment_id, window_no, starts_at,
                                                ends_at, amount, installment_due,
                                                installment_amounts)
        SELECT add_commitment.account_id, id, w, ws, we, w_amount,
               CASE WHEN kind = 'prepaid'
                    THEN array_agg(billing._add_periods(anc, per, billing._period_index(anc, per, ws) + i - 1)
                                   ORDER BY i) END,
               CASE WHEN kind = 'prepaid'
                    THEN array_agg(billing._installment(w_amount, i, installments, cur) ORDER BY i) END
          FROM generate_series(1, installments) i;
        IF kind = 'prepaid' THEN
            INSERT INTO billing.credit_grants (account_id, amount, effective_at, expires_at,
                                               applies_to, source, reason, commitment_id, window_no)
            VALUES (add_commitment.account_id, w_amount, ws, we, applies_to, 'commitment',
                    format('prepaid commitment %s, window %s', id, w), id, w)
            RETURNING billing.credit_grants.grant_id INTO gid;
            INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at)
            VALUES (add_commitment.account_id, billing._ledger_next_seq(add_commitment.account_id),
                    gid, 'grant', w_amount, ws);
        END IF;
    END LOOP;
    -- the details first: on Citus a call with queries in its arguments
    -- would be pushed down to a shard
    SELECT to_jsonb(c) INTO details FROM billing.commitments c
     WHERE c.account_id = add_commitment.account_id AND c.commitment_id = id;
    SELECT details || jsonb_build_object('windows',
               jsonb_agg(jsonb_build_object('window_no', w2.window_no, 'starts_at', w2.starts_at,
                                            'ends_at', w2.ends_at, 'amount', w2.amount)
                         ORDER BY w2.window_no))
      INTO details
      FROM billing.commitment_windows w2
     WHERE w2.account_id = add_commitment.account_id AND w2.commitment_id = id;
    PERFORM billing._audit_append(add_commitment.account_id, 'commit', format('commitment:%s', id),
                                  details);
    RETURN id;
END
$$;
COMMENT ON FUNCTION billing.add_commitment(bigint, text, numeric, timestamptz, timestamptz, interval, text[], integer, numeric) IS
    'Adds a commitment: prepaid (a credit grant per window, invoiced in installments, with rollover) or minimum (a true-up line when a window''s eligible spend falls short)';

-- plan changes -----------------------------------------------------------------------------------

CREATE FUNCTION billing.change_plan(account_id bigint, plan text, at timestamptz DEFAULT pg_catalog.now())
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    s record;
    new_period interval;
    closed timestamptz;
    prev_start timestamptz;
BEGIN
    IF account_id IS NULL OR plan IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'change_plan: account_id, plan and at must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM billing._contract_account(change_plan.account_id);
    SELECT p.period INTO new_period FROM billing.plans p WHERE p.plan = change_plan.plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'plan "%" does not exist', change_plan.plan USING ERRCODE = '23503';
    END IF;
    IF NOT isfinite(at) THEN
        RAISE EXCEPTION 'change_plan: at must be finite' USING ERRCODE = '22023';
    END IF;
    SELECT max(i.period_end) INTO closed FROM billing.invoices i
     WHERE i.account_id = change_plan.account_id;
    IF closed > at THEN
        RAISE EXCEPTION 'account % is invoiced up to %: % is inside an already finalized period',
              change_plan.account_id, closed, at
            USING ERRCODE = '55000', HINT = 'Change the plan at or after the end of the last finalized period.';
    END IF;
    SELECT sub.*, p.period INTO s
      FROM billing.subscriptions sub JOIN billing.plans p ON p.plan = sub.plan
     WHERE sub.account_id = change_plan.account_id AND sub.starts_at <= at
       AND (sub.ends_at IS NULL OR at < sub.ends_at)
       FOR UPDATE OF sub;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % has no subscription at %', change_plan.account_id, at
            USING ERRCODE = '55000', HINT = 'Subscribe the account (insert into billing.subscriptions).';
    END IF;
    IF s.plan = change_plan.plan THEN
        RETURN;               -- already on it
    END IF;
    IF new_period <> s.period THEN
        RAISE EXCEPTION 'plan "%" bills every %, plan "%" every %', change_plan.plan, new_period,
              s.plan, s.period
            USING ERRCODE = '22023', DETAIL = 'A plan change keeps the account''s billing periods.';
    END IF;
    IF s.starts_at = at THEN
        -- a second change at the same moment: back to the plan the account
        -- had before it, the two subscriptions are one again (nothing
        -- changes at `at`: tiers do not restart there); else the one
        -- starting at `at` takes the plan
        SELECT prev.starts_at INTO prev_start FROM billing.subscriptions prev
         WHERE prev.account_id = change_plan.account_id AND prev.ends_at = at
           AND prev.plan = change_plan.plan
           AND prev.spend_cap IS NOT DISTINCT FROM s.spend_cap
           FOR UPDATE;
        IF FOUND THEN
            DELETE FROM billing.subscriptions sub
             WHERE sub.account_id = change_plan.account_id AND sub.starts_at = s.starts_at;
            UPDATE billing.subscriptions sub SET ends_at = s.ends_at
             WHERE sub.account_id = change_plan.account_id AND sub.starts_at = prev_start;
        ELSE
            UPDATE billing.subscriptions sub SET plan = change_plan.plan
             WHERE sub.account_id = change_plan.account_id AND sub.starts_at = s.starts_at;
        END IF;
    ELSE
        UPDATE billing.subscriptions sub SET ends_at = at
         WHERE sub.account_id = change_plan.account_id AND sub.starts_at = s.starts_at;
        INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at, spend_cap, period_anchor)
        VALUES (change_plan.account_id, change_plan.plan, at, s.ends_at, s.spend_cap,
                coalesce(s.period_anchor, s.starts_at));
    END IF;
    PERFORM billing._audit_append(change_plan.account_id, 'change_plan',
        format('subscription:%s/%s', change_plan.account_id, at),
        jsonb_build_object('account_id', change_plan.account_id, 'from_plan', s.plan,
                           'to_plan', change_plan.plan, 'at', at));
END
$$;
COMMENT ON FUNCTION billing.change_plan(bigint, text, timestamptz) IS
    'Moves an account to another plan at a moment: the current subscription ends there and the new one starts there, on the same period grid; the period holding it is one invoice with both plans'' lines';
