-- test/upgrade/catalog.sql: a description of every SQL object of this
-- database that is not PostgreSQL's own, one object attribute per line,
-- sorted, for the schema check of test/upgrade/run.sh.  Two databases whose
-- descriptions are equal have the same objects, in every attribute that a
-- user, pg_dump or a later upgrade script can see: a database where billing
-- 1.0 was installed and updated must describe exactly as a fresh install.
--
-- Each line is "<object> | <attribute>".  Objects are named by
-- pg_describe_object() or a regprocedure/regclass with search_path =
-- pg_catalog, so everything outside pg_catalog is schema-qualified.  No OID
-- is printed; role names stand for role OIDs; ACLs are expanded and sorted
-- (grant order does not matter, a NULL ACL is its default); SET clauses of
-- functions are sorted (their order does not matter either).
--
-- Covered: schemas, the extension (version, owner, every member,
-- pg_extension_config_dump registrations), relations (kind, persistence,
-- options, owner, ACL, columns with type, collation, NOT NULL, default,
-- identity, generated, storage, statistics target, options and ACL;
-- constraints, indexes, triggers with their enabled state, rules, policies,
-- views, sequences and what owns them, inheritance, extended statistics),
-- functions, procedures and aggregates (pg_get_functiondef: arguments with
-- names and defaults, result, language, volatility, strictness, parallel
-- safety, security definer, leakproof, cost, rows, support, body or C
-- symbol; SET clauses; owner; ACL), types (base, composite, domain, enum,
-- range, arrays), operators, operator classes and families with their
-- members, casts, event triggers, comments on anything, pg_init_privs (what
-- pg_dump takes as the extension's own privileges), default ACLs, and any
-- other object created in this database (languages, collations, ...).
--
-- Run with psql -X -At -f; the database should hold nothing but the
-- extension (objects of users' own appear too).
\set ON_ERROR_STOP 1
SET search_path = pg_catalog;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
SET extra_float_digits = 1;
SET jit = off;

-- an ACL, expanded and sorted; NULL stands for the default of its kind
CREATE FUNCTION pg_temp.acl(acl aclitem[], kind "char", owner oid) RETURNS text
    LANGUAGE sql STABLE AS $$
    SELECT coalesce(string_agg(x, ' ' ORDER BY x COLLATE "C"), '(none)')
      FROM (SELECT format('%s=%s%s/%s',
                          CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                          a.privilege_type, CASE WHEN a.is_grantable THEN '*' ELSE '' END,
                          pg_get_userbyid(a.grantor)) AS x
              FROM aclexplode(coalesce(acl, acldefault(kind, owner))) a) s
$$;

-- a column ACL (its default is empty)
CREATE FUNCTION pg_temp.colacl(acl aclitem[]) RETURNS text
    LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN acl IS NULL THEN '(none)' ELSE pg_temp.acl(acl, 'c', 0) END
$$;

WITH
-- schemas of users' objects: everything but PostgreSQL's own and temp schemas
ns AS (
    SELECT n.oid, n.nspname
      FROM pg_namespace n
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
       AND n.nspname !~ '^pg_(toast_)?temp_'
),
rel AS (
    SELECT c.oid, c.relname, c.relkind, c.oid::regclass::text AS name,
           CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'partitioned table'
                          WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
                          WHEN 'S' THEN 'sequence' WHEN 'f' THEN 'foreign table'
                          WHEN 'c' THEN 'composite type' WHEN 'i' THEN 'index'
                          WHEN 'I' THEN 'partitioned index' ELSE c.relkind::text END
               || ' ' || c.oid::regclass::text AS obj
      FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
),
fn AS (
    SELECT p.oid, p.prokind,
           CASE p.prokind WHEN 'a' THEN 'aggregate ' WHEN 'p' THEN 'procedure '
                          WHEN 'w' THEN 'window function ' ELSE 'function ' END
               || p.oid::regprocedure::text AS obj
      FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace
),
lines (obj, ord, line) AS (
    -- the extension
    SELECT 'extension ' || e.extname, 0,
           format('version %s, schema %s, relocatable %s, owner %s', e.extversion,
                  e.extnamespace::regnamespace, e.extrelocatable, pg_get_userbyid(e.extowner))
      FROM pg_extension e WHERE e.oid >= 16384
    UNION ALL
    SELECT 'extension ' || e.extname, 1,
           format('pg_extension_config_dump(%s, %L)', u.cfg::regclass, u.cond)
      FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(cfg, cond)
     WHERE e.oid >= 16384
    UNION ALL
    SELECT 'extension ' || e.extname, 2,
           'member ' || pg_describe_object(d.classid, d.objid, d.objsubid)
      FROM pg_extension e
           JOIN pg_depend d ON d.refclassid = 'pg_extension'::regclass AND d.refobjid = e.oid
                           AND d.deptype = 'e'
     WHERE e.oid >= 16384
    UNION ALL
    SELECT 'extension ' || e.extname, 3,
           'requires extension ' || x.extname
      FROM pg_extension e
           JOIN pg_depend d ON d.classid = 'pg_extension'::regclass AND d.objid = e.oid
                           AND d.refclassid = 'pg_extension'::regclass
           JOIN pg_extension x ON x.oid = d.refobjid
     WHERE e.oid >= 16384

    -- schemas
    UNION ALL
    SELECT 'schema ' || n.nspname, 0,
           format('owner %s, acl %s', pg_get_userbyid(n.nspowner),
                  pg_temp.acl(n.nspacl, 'n', n.nspowner))
      FROM pg_namespace n JOIN ns USING (oid)

    -- relations
    UNION ALL
    SELECT r.obj, 0,
           format('persistence %s, owner %s, options %s, row security %s%s, replica identity %s, acl %s%s',
                  c.relpersistence, pg_get_userbyid(c.relowner), coalesce(c.reloptions::text, '{}'),
                  c.relrowsecurity, CASE WHEN c.relforcerowsecurity THEN ' (forced)' ELSE '' END,
                  c.relreplident,
                  pg_temp.acl(c.relacl, (CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END)::"char", c.relowner),
                  CASE WHEN c.relkind = 'p' THEN ', partition by ' || pg_get_partkeydef(c.oid) ELSE '' END
                  || CASE WHEN c.relispartition THEN ', partition ' || pg_get_expr(c.relpartbound, c.oid) ELSE '' END)
      FROM rel r JOIN pg_class c USING (oid)
     WHERE r.relkind NOT IN ('i', 'I')
    UNION ALL
    SELECT r.obj, 1, 'inherits ' || i.inhparent::regclass::text || ' #' || i.inhseqno
      FROM rel r JOIN pg_inherits i ON i.inhrelid = r.oid
    -- columns, by position among the columns that are not dropped
    UNION ALL
    SELECT r.obj, 1000 + (row_number() OVER w)::int,
           format('column %s %s %s%s%s%s%s%s%s, storage %s%s%s, acl %s',
                  row_number() OVER w,
                  quote_ident(a.attname), format_type(a.atttypid, a.atttypmod),
                  CASE WHEN a.attcollation <> 0 THEN ' collate ' || a.attcollation::regcollation::text ELSE '' END,
                  CASE WHEN a.attnotnull THEN ' not null' ELSE '' END,
                  CASE WHEN a.attidentity <> '' THEN ' identity ' || a.attidentity::text ELSE '' END,
                  CASE WHEN a.attgenerated <> '' THEN ' generated ' || a.attgenerated::text ELSE '' END,
                  CASE WHEN ad.oid IS NOT NULL THEN ' default ' || pg_get_expr(ad.adbin, ad.adrelid) ELSE '' END,
                  CASE WHEN a.attndims <> 0 THEN ' ndims ' || a.attndims ELSE '' END,
                  a.attstorage,
                  CASE WHEN a.attcompression <> '' THEN ', compression ' || a.attcompression::text ELSE '' END,
                  CASE WHEN a.attstattarget <> -1 THEN ', statistics ' || a.attstattarget ELSE '' END
                  || coalesce(', options ' || (SELECT array_agg(o ORDER BY o COLLATE "C")
                                                 FROM unnest(a.attoptions) o
                                                WHERE o !~ '^pg_attver=')::text, ''),
                  pg_temp.colacl(a.attacl))
      FROM rel r
           JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
           LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
     WHERE r.relkind NOT IN ('i', 'I', 'S')
    WINDOW w AS (PARTITION BY a.attrelid ORDER BY a.attnum)
    -- constraints (of tables and domains)
    UNION ALL
    SELECT coalesce(r.obj, 'type ' || co.contypid::regtype::text), 3,
           format('constraint %s: %s%s%s', quote_ident(co.conname), pg_get_constraintdef(co.oid),
                  CASE WHEN NOT co.convalidated THEN ' (not validated)' ELSE '' END,
                  CASE WHEN NOT co.conislocal THEN ' (inherited ' || co.coninhcount || ')' ELSE '' END)
      FROM pg_constraint co
           LEFT JOIN rel r ON r.oid = co.conrelid
           LEFT JOIN pg_type t ON t.oid = co.contypid
     WHERE r.oid IS NOT NULL OR t.typnamespace IN (SELECT oid FROM ns)
    -- indexes, under their table
    UNION ALL
    SELECT r.obj, 4,
           format('index %s%s%s%s%s', pg_get_indexdef(x.indexrelid),
                  CASE WHEN x.indisclustered THEN ' (clustered)' ELSE '' END,
                  CASE WHEN NOT x.indisvalid THEN ' (invalid)' ELSE '' END,
                  CASE WHEN x.indisreplident THEN ' (replica identity)' ELSE '' END,
                  CASE WHEN ic.reloptions IS NOT NULL THEN ' options ' || ic.reloptions::text ELSE '' END)
      FROM rel r JOIN pg_index x ON x.indrelid = r.oid JOIN pg_class ic ON ic.oid = x.indexrelid
    -- triggers (not the internal ones of foreign keys), with their state
    UNION ALL
    SELECT r.obj, 5,
           format('trigger %s (enabled %s)', pg_get_triggerdef(tg.oid), tg.tgenabled)
      FROM rel r JOIN pg_trigger tg ON tg.tgrelid = r.oid AND NOT tg.tgisinternal
    -- rules other than a view's own
    UNION ALL
    SELECT r.obj, 6, format('rule (enabled %s) %s', rw.ev_enabled, pg_get_ruledef(rw.oid))
      FROM rel r JOIN pg_rewrite rw ON rw.ev_class = r.oid AND rw.rulename <> '_RETURN'
    -- policies
    UNION ALL
    SELECT r.obj, 7,
           format('policy %s %s for %s to %s using (%s) with check (%s)',
                  quote_ident(po.polname), CASE WHEN po.polpermissive THEN 'permissive' ELSE 'restrictive' END,
                  po.polcmd,
                  (SELECT string_agg(CASE WHEN ro = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(ro) END, ',' ORDER BY 1)
                     FROM unnest(po.polroles) ro),
                  pg_get_expr(po.polqual, po.polrelid), pg_get_expr(po.polwithcheck, po.polrelid))
      FROM rel r JOIN pg_policy po ON po.polrelid = r.oid
    -- views: the definition, line by line
    UNION ALL
    SELECT r.obj, 100000 + l.n::int, 'view definition: ' || l.line
      FROM rel r, regexp_split_to_table(pg_get_viewdef(r.oid), E'\n') WITH ORDINALITY AS l(line, n)
     WHERE r.relkind IN ('v', 'm')
    -- sequences: parameters and what owns them (not their current value)
    UNION ALL
    SELECT r.obj, 8,
           format('as %s start %s increment %s min %s max %s cache %s%s',
                  s.seqtypid::regtype, s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache,
                  CASE WHEN s.seqcycle THEN ' cycle' ELSE '' END)
      FROM rel r JOIN pg_sequence s ON s.seqrelid = r.oid
    UNION ALL
    SELECT r.obj, 9,
           format('owned by %s (%s)', pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid),
                  CASE d.deptype WHEN 'a' THEN 'serial' WHEN 'i' THEN 'identity' ELSE d.deptype::text END)
      FROM rel r JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = r.oid
                                 AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
     WHERE r.relkind = 'S'
    -- extended statistics
    UNION ALL
    SELECT 'statistics ' || quote_ident(ns.nspname) || '.' || quote_ident(st.stxname), 0,
           format('%s, owner %s, target %s', pg_get_statisticsobjdef(st.oid),
                  pg_get_userbyid(st.stxowner), st.stxstattarget)
      FROM pg_statistic_ext st JOIN ns ON ns.oid = st.stxnamespace

    -- functions and procedures: the whole definition without its SET
    -- clauses, then the SET clauses sorted, the owner and the ACL
    UNION ALL
    SELECT f.obj, 100000 + d.n::int, 'def: ' || d.line
      FROM fn f,
           LATERAL (SELECT l.line, l.n,
                           bool_or(l.n > 1 AND l.line !~ '^ ') OVER (ORDER BY l.n) AS in_body
                      FROM regexp_split_to_table(CASE WHEN f.prokind <> 'a' THEN pg_get_functiondef(f.oid) END, E'\n')
                           WITH ORDINALITY AS l(line, n)) d
     WHERE f.prokind <> 'a'
       AND (d.in_body OR d.line !~ '^ SET ')
    UNION ALL
    SELECT f.obj, 1,
           format('set %s', coalesce((SELECT string_agg(c, ', ' ORDER BY c COLLATE "C")
                                        FROM unnest(p.proconfig) c), '(none)'))
      FROM fn f JOIN pg_proc p USING (oid)
    UNION ALL
    SELECT f.obj, 2,
           format('owner %s, acl %s', pg_get_userbyid(p.proowner), pg_temp.acl(p.proacl, 'f', p.proowner))
      FROM fn f JOIN pg_proc p USING (oid)
    -- aggregates
    UNION ALL
    SELECT f.obj, 3,
           format('aggregate (%s) returns %s, kind %s, direct args %s, sfunc %s, stype %s, sspace %s, '
                  'finalfunc %s (extra %s, modify %s), combinefunc %s, serialfunc %s, deserialfunc %s, '
                  'msfunc %s, minvfunc %s, mstype %s, mfinalfunc %s, initcond %L, minitcond %L, '
                  'sortop %s, parallel %s, strict %s',
                  pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), a.aggkind,
                  a.aggnumdirectargs, a.aggtransfn, a.aggtranstype::regtype, a.aggtransspace,
                  a.aggfinalfn, a.aggfinalextra, a.aggfinalmodify, a.aggcombinefn, a.aggserialfn,
                  a.aggdeserialfn, a.aggmtransfn, a.aggminvtransfn, a.aggmtranstype::regtype,
                  a.aggmfinalfn, a.agginitval, a.aggminitval, a.aggsortop::regoperator,
                  p.proparallel, p.proisstrict)
      FROM fn f JOIN pg_proc p USING (oid) JOIN pg_aggregate a ON a.aggfnoid = p.oid

    -- types (a table's row type is its relation; arrays in one line)
    UNION ALL
    SELECT 'type ' || t.oid::regtype::text, 0,
           CASE
           WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN
               format('array of %s, owner %s', t.typelem::regtype, pg_get_userbyid(t.typowner))
           ELSE
               format('type %s, len %s, byval %s, category %s%s, delim %L, input %s, output %s, '
                      'receive %s, send %s, typmodin %s, typmodout %s, analyze %s, subscript %s, '
                      'align %s, storage %s, not null %s, base %s, typmod %s, ndims %s, collation %s, '
                      'default %L, element %s, owner %s, acl %s',
                      t.typtype, t.typlen, t.typbyval, t.typcategory,
                      CASE WHEN t.typispreferred THEN ' (preferred)' ELSE '' END, t.typdelim,
                      t.typinput, t.typoutput, t.typreceive, t.typsend, t.typmodin, t.typmodout,
                      t.typanalyze, t.typsubscript, t.typalign, t.typstorage, t.typnotnull,
                      nullif(t.typbasetype, 0)::regtype, t.typtypmod, t.typndims,
                      nullif(t.typcollation, 0)::regcollation, t.typdefault,
                      nullif(t.typelem, 0)::regtype, pg_get_userbyid(t.typowner),
                      pg_temp.acl(t.typacl, 'T', t.typowner))
           END
      FROM pg_type t JOIN ns ON ns.oid = t.typnamespace
     WHERE t.typrelid = 0
        OR (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c'
    UNION ALL
    SELECT 'type ' || e.enumtypid::regtype::text, 1,
           format('label %s %L', row_number() OVER (PARTITION BY e.enumtypid ORDER BY e.enumsortorder),
                  e.enumlabel)
      FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid JOIN ns ON ns.oid = t.typnamespace
    UNION ALL
    SELECT 'type ' || rg.rngtypid::regtype::text, 2,
           format('range of %s, multirange %s, collation %s, opclass %s, canonical %s, subdiff %s',
                  rg.rngsubtype::regtype, rg.rngmultitypid::regtype, nullif(rg.rngcollation, 0)::regcollation,
                  rg.rngsubopc::regclass, rg.rngcanonical, rg.rngsubdiff)
      FROM pg_range rg JOIN pg_type t ON t.oid = rg.rngtypid JOIN ns ON ns.oid = t.typnamespace

    -- operators
    UNION ALL
    SELECT 'operator ' || o.oid::regoperator::text, 0,
           format('kind %s, result %s, function %s, commutator %s, negator %s, restrict %s, join %s, '
                  'hashes %s, merges %s, owner %s',
                  o.oprkind, o.oprresult::regtype, o.oprcode::regprocedure,
                  nullif(o.oprcom, 0)::regoperator, nullif(o.oprnegate, 0)::regoperator,
                  o.oprrest, o.oprjoin, o.oprcanhash, o.oprcanmerge, pg_get_userbyid(o.oprowner))
      FROM pg_operator o JOIN ns ON ns.oid = o.oprnamespace
    -- operator families and classes, with their members
    UNION ALL
    SELECT pg_describe_object('pg_opfamily'::regclass, f.oid, 0), 0,
           'owner ' || pg_get_userbyid(f.opfowner)
      FROM pg_opfamily f JOIN ns ON ns.oid = f.opfnamespace
    UNION ALL
    SELECT pg_describe_object('pg_opfamily'::regclass, ao.amopfamily, 0), 1,
           format('operator %s %s (%s, %s) for %s%s', ao.amopstrategy, ao.amopopr::regoperator,
                  ao.amoplefttype::regtype, ao.amoprighttype::regtype, ao.amoppurpose,
                  CASE WHEN ao.amopsortfamily <> 0
                       THEN ' order by ' || pg_describe_object('pg_opfamily'::regclass, ao.amopsortfamily, 0)
                       ELSE '' END)
      FROM pg_amop ao JOIN pg_opfamily f ON f.oid = ao.amopfamily JOIN ns ON ns.oid = f.opfnamespace
    UNION ALL
    SELECT pg_describe_object('pg_opfamily'::regclass, ap.amprocfamily, 0), 2,
           format('function %s (%s, %s) %s', ap.amprocnum, ap.amproclefttype::regtype,
                  ap.amprocrighttype::regtype, ap.amproc::regprocedure)
      FROM pg_amproc ap JOIN pg_opfamily f ON f.oid = ap.amprocfamily JOIN ns ON ns.oid = f.opfnamespace
    UNION ALL
    SELECT pg_describe_object('pg_opclass'::regclass, oc.oid, 0), 0,
           format('for type %s, family %s, default %s, storage %s, owner %s', oc.opcintype::regtype,
                  pg_describe_object('pg_opfamily'::regclass, oc.opcfamily, 0), oc.opcdefault,
                  nullif(oc.opckeytype, 0)::regtype, pg_get_userbyid(oc.opcowner))
      FROM pg_opclass oc JOIN ns ON ns.oid = oc.opcnamespace

    -- casts from, to or through anything of ours
    UNION ALL
    SELECT pg_describe_object('pg_cast'::regclass, ca.oid, 0), 0,
           format('function %s, context %s, method %s', nullif(ca.castfunc, 0)::regprocedure,
                  ca.castcontext, ca.castmethod)
      FROM pg_cast ca WHERE ca.oid >= 16384

    -- event triggers
    UNION ALL
    SELECT 'event trigger ' || quote_ident(et.evtname), 0,
           format('on %s, function %s, enabled %s, tags %s, owner %s', et.evtevent,
                  et.evtfoid::regprocedure, et.evtenabled, coalesce(et.evttags::text, '(all)'),
                  pg_get_userbyid(et.evtowner))
      FROM pg_event_trigger et

    -- comments on anything created in this database
    UNION ALL
    SELECT 'comment on ' || pg_describe_object(ds.classoid, ds.objoid, ds.objsubid), 0, ds.description
      FROM pg_description ds
     WHERE ds.objoid >= 16384
       AND NOT (ds.classoid = 'pg_proc'::regclass
                AND ds.objoid IN (SELECT oid FROM pg_proc WHERE pronamespace = pg_my_temp_schema()))

    -- the privileges pg_dump takes as the extension's own (initial privileges)
    UNION ALL
    SELECT 'initial privileges of ' || pg_describe_object(ip.classoid, ip.objoid, ip.objsubid), 0,
           format('%s %s', ip.privtype,
                  CASE WHEN ip.objsubid <> 0 THEN pg_temp.colacl(ip.initprivs)
                       ELSE pg_temp.acl(ip.initprivs, 'r', 10) END)
      FROM pg_init_privs ip
     WHERE ip.objoid >= 16384

    -- default privileges
    UNION ALL
    SELECT format('default privileges of %s in %s for %s', pg_get_userbyid(da.defaclrole),
                  coalesce(da.defaclnamespace::regnamespace::text, '(all schemas)'), da.defaclobjtype), 0,
           pg_temp.colacl(da.defaclacl)
      FROM pg_default_acl da

    -- anything else created in this database
    UNION ALL
    SELECT 'other ' || pg_describe_object(o.classid, o.objid, 0), 0, 'exists'
      FROM (SELECT 'pg_language'::regclass AS classid, oid AS objid FROM pg_language
            UNION ALL SELECT 'pg_collation'::regclass, oid FROM pg_collation
            UNION ALL SELECT 'pg_conversion'::regclass, oid FROM pg_conversion
            UNION ALL SELECT 'pg_foreign_data_wrapper'::regclass, oid FROM pg_foreign_data_wrapper
            UNION ALL SELECT 'pg_foreign_server'::regclass, oid FROM pg_foreign_server
            UNION ALL SELECT 'pg_publication'::regclass, oid FROM pg_publication
            UNION ALL SELECT 'pg_ts_config'::regclass, oid FROM pg_ts_config
            UNION ALL SELECT 'pg_ts_dict'::regclass, oid FROM pg_ts_dict
            UNION ALL SELECT 'pg_ts_parser'::regclass, oid FROM pg_ts_parser
            UNION ALL SELECT 'pg_ts_template'::regclass, oid FROM pg_ts_template
            UNION ALL SELECT 'pg_transform'::regclass, oid FROM pg_transform
            UNION ALL SELECT 'pg_am'::regclass, oid FROM pg_am) o
     WHERE o.objid >= 16384
)
SELECT obj || ' | ' || line
  FROM lines
 ORDER BY obj COLLATE "C", ord, line COLLATE "C";
