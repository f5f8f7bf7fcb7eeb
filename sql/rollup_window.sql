--
-- stripe_meter_set_rollup_window(): which meters may roll up, and what an
-- event of such a meter looks like in the outbox (its window frozen, not
-- counted as pending).  Forming and sending rollups need the worker: see
-- test/t/045_rollups.pl.
--
\set SHOW_CONTEXT never
SET timezone = 'UTC';

\i sql/try_helper.include

-- from a clean slate
DELETE FROM stripe_meter.outbox;
DELETE FROM stripe_meter.meters;

INSERT INTO stripe_meter.meters (event_name, aggregation) VALUES
	('rw_sum', 'sum'), ('rw_last', 'last'), ('rw_count', 'count');
INSERT INTO stripe_meter.meters (event_name) VALUES ('rw_unknown');

-- Refused where rolling up would change the bill, or cannot be judged.
SELECT pg_temp.try($$SELECT stripe_meter_set_rollup_window('rw_count')$$);
SELECT pg_temp.try($$SELECT stripe_meter_set_rollup_window('rw_unknown')$$);
SELECT pg_temp.try($$SELECT stripe_meter_set_rollup_window('rw_nothing')$$);
-- Whole seconds, from one second to one day.
SELECT pg_temp.try($$SELECT stripe_meter_set_rollup_window('rw_sum', interval '0.5 seconds')$$);
SELECT pg_temp.try($$SELECT stripe_meter_set_rollup_window('rw_sum', interval '1.5 seconds')$$);
SELECT pg_temp.try($$SELECT stripe_meter_set_rollup_window('rw_sum', interval '25 hours')$$);
-- The table says so too, for a change by hand.
SELECT pg_temp.try($$UPDATE stripe_meter.meters SET rollup_window = interval '1 minute' WHERE event_name = 'rw_count'$$);

-- The default is one minute; any whole number of seconds up to a day.
SELECT stripe_meter_set_rollup_window('rw_sum');
SELECT stripe_meter_set_rollup_window('rw_last', interval '1 day');
SELECT event_name, aggregation, rollup_window FROM stripe_meter.meters ORDER BY event_name;

-- An event of such a meter is queued with the end of its window (aligned on
-- whole minutes, or days, since the epoch) and the meter's formula; other
-- events have neither.
-- (One transaction: now() must not move to the next minute in between.)
BEGIN;
SELECT stripe_meter_event_create('rw_sum', '{"stripe_customer_id": "cus_W", "value": 3, "model": "m"}',
	'rw-1', date_trunc('minute', now()) - interval '90 seconds');
SELECT stripe_meter_event_create('rw_last', '{"stripe_customer_id": "cus_W", "value": 4}', 'rw-2');
SELECT stripe_meter_event_create('rw_count', '{"stripe_customer_id": "cus_W", "value": 1}', 'rw-3');
SELECT identifier,
	   rollup_window_end - date_trunc('minute', now()) AS window_end_from_this_minute,
	   rollup_formula
  FROM stripe_meter.outbox WHERE identifier IN ('rw-1', 'rw-3') ORDER BY identifier;
SELECT rollup_window_end = date_trunc('day', now()) + interval '1 day' AS ends_at_midnight,
	   rollup_formula
  FROM stripe_meter.outbox WHERE identifier = 'rw-2';

-- status counts them apart from the events waiting to be sent.
SELECT pending, rollup_waiting,
	   rollup_oldest_window_end = date_trunc('minute', now()) - interval '1 minute' AS oldest_window
  FROM stripe_meter.status;
COMMIT;

-- Off again: events queued from now on are sent by themselves; the queued
-- ones keep their window.
SELECT stripe_meter_set_rollup_window('rw_sum', NULL);
SELECT stripe_meter_event_create('rw_sum', '{"stripe_customer_id": "cus_W", "value": 5}', 'rw-4');
SELECT identifier, rollup_window_end IS NOT NULL AS waits_for_window
  FROM stripe_meter.outbox WHERE identifier IN ('rw-1', 'rw-4') ORDER BY identifier;

DELETE FROM stripe_meter.outbox;
DELETE FROM stripe_meter.meters;
