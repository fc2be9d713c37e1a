-- test/upgrade/compare.sql: the check database of test/upgrade/run.sh.
-- Snapshots of reads.sql (one row per read row, as jsonb) are loaded into
-- snap and compared as multisets, so the order rows come in never matters.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

CREATE TABLE snap (label text NOT NULL, read text NOT NULL, data jsonb NOT NULL);
CREATE INDEX snap_label ON snap (label, read);

-- diff(old, new, project, strip_keys, skip): the rows of snapshot old that
-- snapshot new lacks and the other way round, read by read, each side
-- without the (top-level) keys strip_keys names and without the reads skip
-- names.  With project, a row of new keeps only the keys its read had in
-- old (a column added by the new version is not a difference; a read old
-- had no row of is compared whole).  Rows compare as the text of their
-- jsonb (canonical: equal text is equal jsonb), which is faster.
CREATE FUNCTION diff(old text, new text, project boolean, strip_keys text[], skip text[])
    RETURNS TABLE (read text, side text, data text)
    LANGUAGE sql STABLE AS $$
    WITH o AS (
        SELECT s.read, (s.data - strip_keys)::text COLLATE "C" AS data
          FROM snap s WHERE s.label = old AND NOT s.read = ANY (skip)
    ), keys AS (
        SELECT s.read, array_agg(DISTINCT k) AS keys
          FROM snap s, jsonb_object_keys(s.data) k
         WHERE project AND s.label = old AND NOT s.read = ANY (skip)
         GROUP BY s.read
    ), n AS (
        SELECT s.read,
               CASE WHEN project AND k.keys IS NOT NULL
                    THEN (SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}')
                            FROM jsonb_each(s.data - strip_keys) e
                           WHERE e.key = ANY (k.keys))
                    ELSE s.data - strip_keys END::text COLLATE "C" AS data
          FROM snap s LEFT JOIN keys k USING (read)
         WHERE s.label = new AND NOT s.read = ANY (skip)
    )
    SELECT x.read, 'only in ' || old, x.data FROM (SELECT * FROM o EXCEPT ALL SELECT * FROM n) x
    UNION ALL
    SELECT y.read, 'only in ' || new, y.data FROM (SELECT * FROM n EXCEPT ALL SELECT * FROM o) y
$$;

-- new_keys(old, new): per read, the keys rows of new have that rows of old
-- did not (columns a version added)
CREATE FUNCTION new_keys(old text, new text) RETURNS TABLE (read text, keys text)
    LANGUAGE sql STABLE AS $$
    WITH ok AS (
        SELECT DISTINCT s.read, k FROM snap s, jsonb_object_keys(s.data) k WHERE s.label = old
    ), nk AS (
        SELECT DISTINCT s.read, k FROM snap s, jsonb_object_keys(s.data) k WHERE s.label = new
    )
    SELECT nk.read, string_agg(nk.k, ', ' ORDER BY nk.k)
      FROM nk
     WHERE nk.read IN (SELECT ok.read FROM ok)
       AND NOT EXISTS (SELECT 1 FROM ok WHERE ok.read = nk.read AND ok.k = nk.k)
     GROUP BY nk.read
$$;
