-- stripe_meter 0.1.0 -> 0.2.0
--
-- Every change made to stripe_meter.sql since 0.1.0 is repeated here, so that
-- ALTER EXTENSION stripe_meter UPDATE gives the same objects as a fresh
-- install of 0.2.0.

\echo Use "ALTER EXTENSION stripe_meter UPDATE TO '0.2.0'" to load this file. \quit

-- API v2 (the meter event stream): no per-event object comes back, so a
-- delivered event records that its request was accepted, and with which
-- meter event session.
ALTER TABLE stripe_meter.meter_events ADD COLUMN session_id text;
ALTER TABLE stripe_meter.meter_events DROP CONSTRAINT meter_events_outcome_check;
ALTER TABLE stripe_meter.meter_events ADD CONSTRAINT meter_events_outcome_check
	CHECK (outcome IN ('created', 'replayed', 'already_existed', 'accepted'));
COMMENT ON COLUMN stripe_meter.meter_events.meter_event IS
	'The billing.meter_event Stripe returned; NULL when Stripe already had the identifier or with API v2 (no per-event object)';
COMMENT ON COLUMN stripe_meter.meter_events.outcome IS
	'created: Stripe created the event; replayed: Stripe replayed its stored answer for the idempotency key; already_existed: Stripe already had the identifier; accepted: the v2 meter event stream accepted the request carrying it';
COMMENT ON COLUMN stripe_meter.meter_events.session_id IS
	'API v2: the id of the meter event session the event was sent with; NULL with API v1';
