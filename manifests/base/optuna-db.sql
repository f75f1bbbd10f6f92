-- The database and role of `gpunet search`'s Optuna study (RDB storage), in the stack's
-- PostgreSQL next to MLflow's. Run by the Job gpunet-optuna-db (optuna-db.yaml) as the server's
-- superuser (POSTGRES_USER of gpunet-postgres) on every deploy, fresh or existing volume alike:
--   psql -v ON_ERROR_STOP=1 --no-psqlrc -f optuna-db.sql
-- Idempotent: the role and the database are created only when missing; the role's password and
-- rights and the database's owner and privileges are (re)set on every run, so a changed
-- optuna.env takes effect on the next run. The one source of the names and the password is the
-- URL the search steps read, $GPUNET_SEARCH_STORAGE (Secret gpunet-optuna, from
-- secrets/optuna.env): postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DATABASE (or +psycopg,
-- or none: SQLAlchemy's driver, not PostgreSQL's business).
-- psql 15+ (\getenv); the Job runs the server's image, postgres:16.
\set ON_ERROR_STOP on
\set QUIET on

\getenv storage_url GPUNET_SEARCH_STORAGE
\if :{?storage_url}
\else
  DO $$ BEGIN RAISE EXCEPTION 'GPUNET_SEARCH_STORAGE is not set (Secret gpunet-optuna)'; END $$;
\endif

-- USER and DATABASE: lower-case SQL names; PASSWORD: URL-unreserved characters only (nothing to
-- percent-decode), e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))'.
-- A NULL (no match) leaves the variables unset. Never echo the URL: it holds the password.
SELECT m[1] AS optuna_user, m[2] AS optuna_password, m[3] AS optuna_db
  FROM regexp_match(:'storage_url',
         '^postgresql(?:\+psycopg2?)?://([a-z_][a-z0-9_]*):([A-Za-z0-9._~-]+)@[^/?#@]+/([a-z_][a-z0-9_]*)$')
       AS m
\gset
\if :{?optuna_db}
\else
  DO $$ BEGIN RAISE EXCEPTION 'GPUNET_SEARCH_STORAGE is not postgresql[+psycopg2|+psycopg]://USER:PASSWORD@HOST:PORT/DATABASE (lower-case USER and DATABASE, PASSWORD of A-Z a-z 0-9 . _ ~ - only)'; END $$;
\endif

-- Never touch the superuser (MLflow's account) or MLflow's, the maintenance or a template
-- database: the ALTERs below would demote or hand them over.
SELECT :'optuna_user' <> current_user
       AND NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'optuna_user' AND rolsuper)
       AND :'optuna_db' NOT IN (current_database(), 'postgres', 'template0', 'template1')
       AS names_ok
\gset
\if :names_ok
\else
  DO $$ BEGIN RAISE EXCEPTION 'GPUNET_SEARCH_STORAGE names the superuser, MLflow''s database or a system database: give the study its own USER and DATABASE'; END $$;
\endif

-- the role: created if missing; password and (no) rights from the URL on every run
SELECT format('CREATE ROLE %I', :'optuna_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'optuna_user')
\gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
              'NOBYPASSRLS PASSWORD %L', :'optuna_user', :'optuna_password')
\gexec

-- the database, owned by the role (so it owns its public schema and creates Optuna's tables);
-- CREATE DATABASE cannot run in a DO block or transaction, hence \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'optuna_db', :'optuna_user')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'optuna_db')
\gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'optuna_db', :'optuna_user')
\gexec

-- Only the owner (and the superuser) may connect to the study's database, and the study's role
-- to no other: KFP task pods reach this server (network-policies.yaml), so their role must not
-- get into MLflow's database. MLflow logs in as the superuser, whom CONNECT does not restrict.
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'optuna_db')
\gexec
SELECT format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', datname)
  FROM pg_database
 WHERE datname IN (current_database(), 'postgres') AND datname <> :'optuna_db'
\gexec

\unset optuna_password
\unset storage_url
\echo 'database' :"optuna_db" 'of role' :"optuna_user" 'is ready'
