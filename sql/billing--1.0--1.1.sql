-- billing 1.0 -> 1.1 upgrade script, written by hand.
--
-- Every change to the SQL objects made after 1.0 is released goes here as
-- well as into the parts under sql/install/ (which assemble the fresh 1.1
-- script).  The upgrade test (test/upgrade/run.sh) installs the frozen
-- sql/billing--1.0.sql, feeds it a history, runs ALTER EXTENSION billing
-- UPDATE and compares the catalog and the data with a fresh 1.1 install.
\echo Use "ALTER EXTENSION billing UPDATE TO '1.1'" to load this file. \quit

-- ---- issue 13, defect 1: verify_invoices rates lines on its own -------------------------
-- billing._rate_check: rate() without a cache and without the fast path,
-- for the checker; _verify_invoices calls it instead of billing.rate.
CREATE FUNCTION billing._rate_check(p billing.price, quantity pg_catalog.numeric)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_rate_check'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._rate_check(billing.price, pg_catalog.numeric) IS
    'Internal, for verify_invoices: rate() without any cache (the price decoded on every call) on the numeric path only';
REVOKE ALL ON FUNCTION billing._rate_check(billing.price, pg_catalog.numeric) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._rate_check(billing.price, pg_catalog.numeric) TO billing_reader;

CREATE OR REPLACE FUNCTION billing._verify_invoices(p_account bigint)
    RETURNS TABLE (r_account_id bigint, r_invoice_id bigint, r_line_no int, r_problem text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT i.account_id, i.invoice_id, NULL::int,
           format('total %s is not the sum of the lines (%s)', i.total, coalesce(l.s, 0))
      FROM billing.invoices i
           LEFT JOIN LATERAL (SELECT sum(x.amount) AS s FROM billing.invoice_lines x
                               WHERE x.account_id = i.account_id AND x.invoice_id = i.invoice_id) l ON true
     WHERE (p_account IS NULL OR i.account_id = p_account) AND i.total IS DISTINCT FROM coalesce(l.s, 0)
    UNION ALL
    SELECT x.account_id, x.invoice_id, x.line_no,
           format('%s line rates %s to %s, not %s', x.kind, coalesce(x.quantity, 0),
                  billing.round_money(billing._rate_check(x.price, coalesce(x.quantity, 0)), i.currency),
                  x.amount)
      FROM billing.invoice_lines x
           JOIN billing.invoices i ON i.account_id = x.account_id AND i.invoice_id = x.invoice_id
     WHERE (p_account IS NULL OR x.account_id = p_account) AND x.kind IN ('usage', 'fixed')
       AND (x.price IS NULL
            OR billing.round_money(billing._rate_check(x.price, coalesce(x.quantity, 0)), i.currency) <> x.amount)
    ORDER BY 1, 2, 3;
END
$$;

-- ---- issue 13, defect 7: error style (price binary input, _rollup_totals) ---------------
-- price_recv raises 22P03 (invalid binary representation); a set-returning
-- function is STRICT rather than returning a NULL row.
COMMENT ON FUNCTION billing.price_recv(pg_catalog.internal) IS
    'Binary input of billing.price: format version byte 1, then the text form; bad bytes raise 22P03';
ALTER FUNCTION billing._rollup_totals(bigint[], timestamptz[], timestamptz[], text[], text[]) STRICT;
