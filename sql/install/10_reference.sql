/*
 * Reference data: meters and accounts (SPEC section 2).
 */

CREATE TABLE billing.meters (
    meter          text COLLATE "C" PRIMARY KEY
                   CHECK (meter <> '' AND pg_catalog.octet_length(meter) < 64),
    aggregation    text NOT NULL DEFAULT 'sum'
                   CHECK (aggregation IN ('sum', 'count', 'max', 'last', 'unique')),
    bucket_width   interval NOT NULL DEFAULT '1 minute'
                   CHECK (bucket_width > interval '0'
                          AND pg_catalog.date_part('month', bucket_width) = 0
                          AND pg_catalog.date_part('year', bucket_width) = 0),
    late_window    interval NOT NULL DEFAULT '35 days'
                   CHECK (late_window >= interval '0'),
    dedupe_window  interval NOT NULL DEFAULT '35 days'
                   CHECK (dedupe_window >= interval '0'),
    unit           text
);
COMMENT ON TABLE billing.meters IS
    'What is metered: one row per meter, with its aggregation, bucket width, late and dedupe windows';

CREATE TABLE billing.accounts (
    account_id  bigint PRIMARY KEY CHECK (account_id > 0),
    currency    text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    name        text
);
COMMENT ON TABLE billing.accounts IS
    'Billed accounts; account_id 0 is reserved for the catalog audit chain';

SELECT pg_catalog.pg_extension_config_dump('billing.meters', '');
SELECT pg_catalog.pg_extension_config_dump('billing.accounts', '');
