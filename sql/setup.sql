-- setup: runs first; installs the extension the other regression tests use.
CREATE EXTENSION billing;
SELECT extname, extversion FROM pg_extension WHERE extname = 'billing';
