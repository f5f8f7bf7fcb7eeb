--
-- NOT IN THE REGRESS LIST YET: asserts the intended behaviour of a known bug.
--
-- stripe_meter_event_trigger() writes a numeric value column into the JSON
-- payload as a bare number.  numeric's NaN and Infinity are not JSON, so
-- today the payload itself fails to parse (22P02, invalid input syntax for
-- type json).  They are not whole numbers: the trigger must refuse them
-- like any other value that is not (22023), with a meter event message.
--
\set SHOW_CONTEXT never
CREATE FUNCTION pg_temp.sqlstate_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE stmt;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || CASE WHEN SQLERRM LIKE 'meter event %' THEN ' (meter event error)' ELSE '' END;
END
$$;

CREATE TABLE nan_usage (customer text, n numeric);
CREATE TRIGGER t AFTER INSERT ON nan_usage
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('nan', 'customer', 'n');
SELECT pg_temp.sqlstate_of($$INSERT INTO nan_usage VALUES ('cus_N', 'NaN')$$);
SELECT pg_temp.sqlstate_of($$INSERT INTO nan_usage VALUES ('cus_N', 'Infinity')$$);
SELECT count(*) AS rows FROM nan_usage;
SELECT count(*) AS queued FROM stripe_meter.outbox;
DROP TABLE nan_usage;
