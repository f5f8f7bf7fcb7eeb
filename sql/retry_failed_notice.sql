--
-- NOT IN THE REGRESS LIST YET: asserts the intended behaviour of a known bug.
--
-- stripe_meter_retry_failed(NULL) reports in a NOTICE how many failed
-- events it left behind (too old to send).  It must count the events that
-- are still failed after the retry, not every failed event that existed
-- when the statement started.
--
SET timezone = 'UTC';

CREATE PROCEDURE pg_temp.add_failed(id text, age interval)
LANGUAGE sql AS $$
	INSERT INTO stripe_meter.failed_events
		(identifier, event_name, payload, ts, customer, reason, enqueued_at, attempts)
	VALUES (id, 'api_requests', '{"stripe_customer_id": "cus_R", "value": 5}',
			now() - age, 'cus_R', 'timeout', now() - age, 3)
$$;

-- Every failed event can be sent again: all are queued, and no NOTICE.
CALL pg_temp.add_failed('n-1', '1 day');
CALL pg_temp.add_failed('n-2', '2 days');
SELECT stripe_meter_retry_failed();
SELECT count(*) AS failed FROM stripe_meter.failed_events;
DELETE FROM stripe_meter.outbox;

-- Two can be sent, one cannot: the NOTICE names one event.
CALL pg_temp.add_failed('n-3', '1 day');
CALL pg_temp.add_failed('n-4', '2 days');
CALL pg_temp.add_failed('n-old', '40 days');
SELECT stripe_meter_retry_failed();
SELECT identifier FROM stripe_meter.failed_events;

DELETE FROM stripe_meter.failed_events;
DELETE FROM stripe_meter.outbox;

-- Events Stripe may have billed (maybe_billed) are left out unless forced,
-- and a NOTICE says how many and why.
CALL pg_temp.add_failed('n-5', '1 day');
CALL pg_temp.add_failed('n-maybe-1', '1 day');
CALL pg_temp.add_failed('n-maybe-2', '2 days');
UPDATE stripe_meter.failed_events SET maybe_billed = true WHERE identifier LIKE 'n-maybe-%';
SELECT stripe_meter_retry_failed();
SELECT identifier FROM stripe_meter.failed_events ORDER BY identifier;
-- Both kinds left behind: one NOTICE for each.
CALL pg_temp.add_failed('n-old-2', '40 days');
SELECT stripe_meter_retry_failed();
-- With force they are queued; the one too old still is not.
SELECT stripe_meter_retry_failed(force => true);
SELECT identifier FROM stripe_meter.failed_events ORDER BY identifier;

DELETE FROM stripe_meter.failed_events;
DELETE FROM stripe_meter.outbox;
