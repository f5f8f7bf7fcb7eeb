--
-- NOT IN THE REGRESS LIST YET: asserts the intended behaviour of a known bug.
--
-- stripe_meter_event_trigger() returns the row only when fired BEFORE.  As
-- an INSTEAD OF trigger on a view it queues the event but returns NULL,
-- which tells PostgreSQL that nothing was done: INSERT reports 0 rows and
-- RETURNING returns nothing although an event was queued.  An INSTEAD OF
-- trigger should return the new row, like a BEFORE trigger.
--
CREATE TABLE io_base (customer text, n int);
CREATE VIEW io_view AS SELECT * FROM io_base;
CREATE TRIGGER t INSTEAD OF INSERT OR UPDATE ON io_view
	FOR EACH ROW EXECUTE FUNCTION stripe_meter_event_trigger('via_view', 'customer', 'n');
WITH ins AS (INSERT INTO io_view VALUES ('cus_V', 3) RETURNING *)
SELECT customer, n FROM ins;
INSERT INTO io_base VALUES ('cus_W', 1);
WITH upd AS (UPDATE io_view SET n = 9 RETURNING *)
SELECT customer, n FROM upd;
SELECT customer, payload->'value' AS value FROM stripe_meter.outbox
 WHERE event_name = 'via_view' ORDER BY id;
DROP VIEW io_view;
DROP TABLE io_base;
DELETE FROM stripe_meter.outbox;
