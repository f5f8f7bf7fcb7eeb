--
-- stripe_meter_retry_failed(identifier): failed events back into the outbox,
-- one by identifier or all (NULL), through the same validation as new ones.
--
\set SHOW_CONTEXT never
SET timezone = 'UTC';

\i sql/try_helper.include

-- Failed events, as the worker records them.
CREATE PROCEDURE pg_temp.add_failed(id text, age interval, payload jsonb DEFAULT NULL,
									event_name text DEFAULT 'api_requests',
									account text DEFAULT NULL)
LANGUAGE sql AS $$
	INSERT INTO stripe_meter.failed_events
		(identifier, event_name, payload, ts, stripe_account, customer, reason,
		 http_status, stripe_error, request_id, enqueued_at, first_attempt_at, attempts)
	VALUES (id, event_name,
			coalesce(payload, '{"stripe_customer_id": "cus_R", "value": 5}'),
			now() - age, account, coalesce(payload->>'stripe_customer_id', 'cus_R'),
			'No such customer: ''cus_R''', 400,
			'{"error": {"type": "invalid_request_error", "code": "resource_missing"}}',
			'req_123', now() - age, now() - age, 3)
$$;
CALL pg_temp.add_failed('f-1', '1 day', '{"stripe_customer_id": "cus_R", "value": 5, "region": "eu"}',
						  account => 'acct_9');
CALL pg_temp.add_failed('f-2', '2 days');
CALL pg_temp.add_failed('f-3', '3 days');
CALL pg_temp.add_failed('f-old', '40 days');
SELECT count(*) AS queued FROM stripe_meter.outbox;
SELECT count(*) AS failed FROM stripe_meter.failed_events;
CREATE TEMP TABLE failed_before AS SELECT * FROM stripe_meter.failed_events;

-- One event: it returns 1, the event is queued again as a fresh event
-- with its identifier, name, payload, timestamp and account, keeping when
-- it was first attempted ...
BEGIN;
SELECT stripe_meter_retry_failed('f-1');
SELECT o.identifier, o.event_name, o.payload, o.stripe_account, o.customer,
	   o.ts = f.ts AS same_ts,
	   o.enqueued_at BETWEEN now() AND clock_timestamp() AS enqueued_now,
	   o.attempts, o.first_attempt_at = f.first_attempt_at AS same_first_attempt,
	   o.unknown_outcome_since, o.in_flight_since, o.last_http_status, o.last_error
  FROM stripe_meter.outbox o JOIN failed_before f USING (identifier);
COMMIT;
-- ... and it is no longer failed
SELECT identifier FROM stripe_meter.failed_events ORDER BY identifier;
-- ... so it cannot be retried twice
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed('f-1')$$);

-- Unknown identifiers
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed('no-such-event')$$);
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed('')$$);
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed('F-2')$$);

-- An event whose timestamp has left Stripe's 35-day window cannot be
-- queued again; it stays failed.
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed('f-old')$$);
SELECT identifier FROM stripe_meter.failed_events ORDER BY identifier;

-- Nor can one the meter would now refuse, or one whose identifier was
-- delivered meanwhile.
INSERT INTO stripe_meter.meters VALUES ('renamed_keys', 'account', 'units');
CALL pg_temp.add_failed('f-keys', '1 hour', event_name => 'renamed_keys');
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed('f-keys')$$);
DELETE FROM stripe_meter.meters;
CALL pg_temp.add_failed('f-delivered', '1 hour');
INSERT INTO stripe_meter.meter_events
	(identifier, event_name, payload, ts, customer, outcome, enqueued_at, attempts)
VALUES ('f-delivered', 'api_requests', '{"stripe_customer_id": "cus_R", "value": "5"}',
		now(), 'cus_R', 'already_existed', now(), 1);
SELECT pg_temp.try($$SELECT stripe_meter_retry_failed('f-delivered')$$);
DELETE FROM stripe_meter.meter_events;
DELETE FROM stripe_meter.failed_events WHERE identifier IN ('f-keys', 'f-delivered');

-- A rolled-back retry leaves the event failed.
BEGIN;
SELECT stripe_meter_retry_failed('f-2');
ROLLBACK;
SELECT identifier FROM stripe_meter.failed_events ORDER BY identifier;
SELECT count(*) AS queued FROM stripe_meter.outbox;

-- NULL retries every event still inside the window and returns how many;
-- the others stay failed.  (The NOTICE about those is checked in
-- retry_failed_notice.sql.)
SET client_min_messages = warning;
SELECT stripe_meter_retry_failed(NULL);
RESET client_min_messages;
SELECT identifier, attempts FROM stripe_meter.outbox ORDER BY identifier;
SELECT identifier FROM stripe_meter.failed_events ORDER BY identifier;
-- Only events too old to send: none is queued, and a NOTICE says why.
SELECT stripe_meter_retry_failed();
SELECT identifier FROM stripe_meter.failed_events ORDER BY identifier;
-- Nothing failed: 0, no NOTICE.
DELETE FROM stripe_meter.failed_events;
SELECT stripe_meter_retry_failed();

DELETE FROM stripe_meter.outbox;

-- Events that failed while Stripe may have billed them (maybe_billed):
-- retrying all leaves them failed (the NOTICE is checked in
-- retry_failed_notice.sql); naming one queues it, and so does force.  A
-- retried event keeps when it was first attempted and when an attempt's
-- outcome became unknown, so the resend window still counts from then.
CALL pg_temp.add_failed('m-1', '2 hours');
CALL pg_temp.add_failed('m-2', '3 hours');
CALL pg_temp.add_failed('m-plain', '1 hour');
UPDATE stripe_meter.failed_events
   SET maybe_billed = true, unknown_outcome_since = first_attempt_at + interval '1 minute'
 WHERE identifier IN ('m-1', 'm-2');
CREATE TEMP TABLE maybe_before AS SELECT * FROM stripe_meter.failed_events;
SET client_min_messages = warning;
SELECT stripe_meter_retry_failed();
RESET client_min_messages;
SELECT identifier, maybe_billed FROM stripe_meter.failed_events ORDER BY identifier;
SELECT identifier FROM stripe_meter.outbox ORDER BY identifier;
SELECT stripe_meter_retry_failed('m-1');
SELECT stripe_meter_retry_failed(force => true);
SELECT count(*) AS failed FROM stripe_meter.failed_events;
SELECT o.identifier, o.attempts,
	   o.first_attempt_at = f.first_attempt_at AS same_first_attempt,
	   o.unknown_outcome_since = f.unknown_outcome_since AS same_unknown_since,
	   o.unknown_outcome_since IS NULL AS no_unknown_since
  FROM stripe_meter.outbox o JOIN maybe_before f USING (identifier)
 ORDER BY o.identifier;
-- A NULL force is no force.
CALL pg_temp.add_failed('m-3', '1 hour');
UPDATE stripe_meter.failed_events SET maybe_billed = true WHERE identifier = 'm-3';
SET client_min_messages = warning;
SELECT stripe_meter_retry_failed(NULL, NULL);
RESET client_min_messages;
SELECT identifier FROM stripe_meter.failed_events ORDER BY identifier;

DELETE FROM stripe_meter.failed_events;
DELETE FROM stripe_meter.outbox;
