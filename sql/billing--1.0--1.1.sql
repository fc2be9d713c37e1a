-- billing 1.0 -> 1.1 upgrade script, written by hand.
--
-- Every change to the SQL objects made after 1.0 is released goes here as
-- well as into the parts under sql/install/ (which assemble the fresh 1.1
-- script).  The upgrade test (test/upgrade/run.sh) installs the frozen
-- sql/billing--1.0.sql, feeds it a history, runs ALTER EXTENSION billing
-- UPDATE and compares the catalog and the data with a fresh 1.1 install.
\echo Use "ALTER EXTENSION billing UPDATE TO '1.1'" to load this file. \quit
