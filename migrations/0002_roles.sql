-- 0002: least privilege. Two kinds of access to a tilesmith database:
--   * the harvester's role: the role that runs `harvester migrate` owns every table, sequence, type and the
--     `dataset` view created here, so the harvester (and loaders such as `trainer.datasets`) connect as it;
--   * tilesmith_reader: a NOLOGIN group role that may only SELECT from the `dataset` view. The trainer connects as a
--     login role that is a member of it (`CREATE ROLE trainer LOGIN IN ROLE tilesmith_reader`; see README).
-- The view is not security_invoker, so its base tables are read with the owner's privileges: the reader needs, and
-- gets, nothing on samples, jobs, sample_points, areas, buildings or schema_migrations.

-- Roles are cluster-wide, migrations run per database, and several databases may be migrated at once (one test
-- database per test, or several deployments on one server). Check first, so that a migrating role without CREATEROLE
-- works where an administrator created the role beforehand; catch the error of a concurrent creator: CREATE ROLE of a
-- name committed meanwhile raises duplicate_object, of a name whose creator is still in flight waits for it and then
-- raises unique_violation (pg_authid_rolname_index).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'tilesmith_reader') THEN
        CREATE ROLE tilesmith_reader NOLOGIN;
        -- Only by the creator: a comment is one row in a shared catalog, racy to update from several databases.
        COMMENT ON ROLE tilesmith_reader IS 'tilesmith: may SELECT the dataset view only; grant it to the trainer''s login';
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN
        NULL;  -- created by a concurrent migration of another database: the same role, nothing left to do
END
$$;

-- CONNECT is granted to PUBLIC by default; granting it explicitly keeps the reader working where an administrator
-- revoked that default. The database name is only known at run time, hence EXECUTE.
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO tilesmith_reader', current_database());
END
$$;

-- USAGE on the schema to resolve `dataset`, and PostGIS's type and functions, installed in public (ST_AsText and
-- the other PostGIS functions are executable by PUBLIC, which the reader is part of; spatial_ref_sys is readable by
-- PUBLIC as PostGIS installs it). PostgreSQL 15 no longer grants CREATE on schema public to PUBLIC; the REVOKE keeps
-- it so on databases created from an older template (a no-op with a warning where the migrating role may not).
GRANT USAGE ON SCHEMA public TO tilesmith_reader;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

GRANT SELECT ON dataset TO tilesmith_reader;
-- Left as PostgreSQL has it: TEMPORARY on the database stays granted to PUBLIC, so the reader may make temporary
-- tables (private to its session, gone with it); revoking it would be a database-wide change for every role.
