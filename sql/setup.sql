-- setup: runs first; installs the extension the other regression tests use.
-- It walks the upgrade chain, as a database created on 1.0 would: the
-- frozen 1.0 script, then every upgrade script up to the current version.
-- (pgTAP runs on a fresh install of the current version, and the upgrade
-- test compares the two.)
CREATE EXTENSION billing VERSION '1.0';
ALTER EXTENSION billing UPDATE;
SELECT extname, extversion FROM pg_extension WHERE extname = 'billing';

-- The helpers the other tests share (schema "test": sqlstate_of,
-- row_count_of, show), created once here; pgTAP files include the same
-- file.  (pg_regress feeds this script on standard input, so the path is
-- relative to the top directory, where make runs it.)
\ir test/helpers.sql
