--
-- NOT IN THE REGRESS LIST YET: asserts the intended behaviour of a known bug.
--
-- Payload keys cannot contain '[' or ']' (the form encoding uses them), so
-- a meter whose customer or value key has one can never receive an event:
-- every event of it is refused.  stripe_meter.meters accepts such keys
-- today; it should refuse them with a CHECK constraint (23514), as it
-- already refuses empty keys.
--
CREATE FUNCTION pg_temp.sqlstate_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE stmt;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE;
END
$$;

SELECT pg_temp.sqlstate_of($$INSERT INTO stripe_meter.meters VALUES ('m1', 'customer[id]', 'value')$$);
SELECT pg_temp.sqlstate_of($$INSERT INTO stripe_meter.meters VALUES ('m2', 'stripe_customer_id', 'value]')$$);
SELECT pg_temp.sqlstate_of($$INSERT INTO stripe_meter.meters VALUES ('m3', '[', 'value')$$);
SELECT count(*) AS meters FROM stripe_meter.meters;
DELETE FROM stripe_meter.meters;
