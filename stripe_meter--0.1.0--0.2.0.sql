-- stripe_meter 0.1.0 -> 0.2.0
--
-- Every change made to stripe_meter.sql since 0.1.0 is repeated here, so that
-- ALTER EXTENSION stripe_meter UPDATE gives the same objects as a fresh
-- install of 0.2.0.

\echo Use "ALTER EXTENSION stripe_meter UPDATE TO '0.2.0'" to load this file. \quit
