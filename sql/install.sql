-- CREATE EXTENSION works with default settings, without preloading.
CREATE EXTENSION stripe_meter;

-- Every object the extension owns; an accidental change fails here.  From
-- 17 on, a table's or view's row type and its array type are members too:
-- they come with the relation, so every version lists the relations alone.
SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS object
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'stripe_meter')
   AND d.deptype = 'e'
   AND NOT (d.classid = 'pg_type'::regclass AND EXISTS (
            SELECT FROM pg_type t LEFT JOIN pg_type elem ON elem.oid = t.typelem
             WHERE t.oid = d.objid AND (t.typrelid <> 0 OR elem.typrelid <> 0)))
 ORDER BY 1;

-- The user-facing functions live in the extension's schema (public here),
-- the tables and views in the stripe_meter schema.
SELECT n.nspname, p.proname
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE p.proname LIKE 'stripe_meter_%'
 ORDER BY 2;

-- The seed example from the brief.
SELECT stripe_meter_event_create('ai_search_api',
	'{"stripe_customer_id": "cus_NciAYcXfLnqBoz", "value": 25}',
	'identifier_123', now());
SELECT identifier, event_name, payload, customer, attempts, in_flight_since
  FROM stripe_meter.outbox;

-- Leave the outbox empty for the files that follow.
DELETE FROM stripe_meter.outbox;
