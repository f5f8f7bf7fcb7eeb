/*-------------------------------------------------------------------------
 *
 * event_validate.c
 *	  Check one meter event the way Stripe would, before it is queued.
 *
 * Every rule here mirrors what Stripe's Meter Events API validates (names
 * and identifiers of at most 100 characters, the payload's keys, customer
 * and value, a timestamp from 35 days past to 5 minutes ahead), so that an
 * event that reaches the outbox is one Stripe accepts; an event it would
 * reject is refused at enqueue time, in the caller's transaction, with a
 * SQLSTATE.
 * The functions are pure: no SQL, no shared state.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/event_validate.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/string.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

static void check_name_field(const char *field, const char *value);
static void check_payload(const MeterEventInput *event, char **customer);
static void check_value(const char *key, JsonbValue *value);
static void check_timestamp(TimestampTz ts, TimestampTz reference);
static void check_stripe_account(const char *account);
static const char *jsonb_value_kind(JsonbValue *value);

/*
 * MeterEventValidate
 *		Raise an ERROR for anything Stripe would reject in this event.
 *
 * Returns the customer the payload names (palloc'd in the current context).
 */
char *
MeterEventValidate(const MeterEventInput *event)
{
	char	   *customer = NULL;

	if (event->event_name == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("meter event field \"%s\" cannot be null", "event_name")));
	if (event->payload == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("meter event field \"%s\" cannot be null", "payload")));

	check_name_field("event_name", event->event_name);
	check_name_field("identifier", event->identifier);
	check_payload(event, &customer);
	check_timestamp(event->ts, event->reference_time);
	if (event->stripe_account != NULL)
		check_stripe_account(event->stripe_account);

	return customer;
}

/*
 * Stripe's event_name and identifier: non-empty strings of at most 100
 * characters (the schema's maxLength counts characters, not bytes).
 */
static void
check_name_field(const char *field, const char *value)
{
	int			len;

	if (value[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("meter event field \"%s\" cannot be empty", field)));

	len = pg_mbstrlen(value);
	if (len > STRIPE_MAX_NAME_CHARS)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("meter event field \"%s\" is too long", field),
				 errdetail("The value has %d characters; Stripe accepts at most %d.",
						   len, STRIPE_MAX_NAME_CHARS)));
}

/*
 * The payload is a flat JSON object of scalars.  It must name the customer
 * and the value under the meter's keys; every value is sent as a string of
 * at most 100 characters, and keys cannot hold brackets, which the form
 * encoding (payload[KEY]=VALUE) uses as delimiters.
 */
static void
check_payload(const MeterEventInput *event, char **customer)
{
	Jsonb	   *payload = event->payload;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	bool		saw_customer = false;
	bool		saw_value = false;
	char	   *key = NULL;
	StringInfoData text;

	if (!JB_ROOT_IS_OBJECT(payload) || JB_ROOT_IS_SCALAR(payload))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("meter event payload must be a JSON object"),
				 errdetail("The payload given is a JSON %s.",
						   JB_ROOT_IS_ARRAY(payload) && !JB_ROOT_IS_SCALAR(payload) ?
						   "array" : "scalar")));

	initStringInfo(&text);
	it = JsonbIteratorInit(&payload->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			key = pnstrdup(v.val.string.val, v.val.string.len);
			if (key[0] == '\0')
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("meter event payload keys cannot be empty")));
			if (strchr(key, '[') != NULL || strchr(key, ']') != NULL)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("meter event payload key \"%s\" cannot contain brackets",
								key),
						 errdetail("Stripe receives the payload as payload[KEY]=VALUE form fields.")));
			/* like the values: a longer key is refused by Stripe-like servers */
			if (pg_mbstrlen(key) > STRIPE_MAX_PAYLOAD_KEY_CHARS)
				ereport(ERROR,
						(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
						 errmsg("meter event payload key is too long"),
						 errdetail("The key has %d characters; Stripe accepts at most %d.",
								   pg_mbstrlen(key), STRIPE_MAX_PAYLOAD_KEY_CHARS)));
			continue;
		}
		if (tok != WJB_VALUE)
			continue;

		if (v.type != jbvString && v.type != jbvNumeric && v.type != jbvBool)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("meter event payload value for key \"%s\" must be a string, number or boolean",
							key),
					 errdetail("The value is a JSON %s; Stripe payload values are strings, so nested objects, arrays and nulls cannot be sent.",
							   jsonb_value_kind(&v))));

		if (strcmp(key, event->value_key) == 0)
		{
			check_value(key, &v);
			saw_value = true;
			continue;
		}

		resetStringInfo(&text);
		MeterEventScalarText(&v, &text);
		if (pg_mbstrlen(text.data) > STRIPE_MAX_PAYLOAD_VALUE_CHARS)
			ereport(ERROR,
					(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
					 errmsg("meter event payload value for key \"%s\" is too long", key),
					 errdetail("The value has %d characters; Stripe accepts at most %d.",
							   pg_mbstrlen(text.data), STRIPE_MAX_PAYLOAD_VALUE_CHARS)));

		if (strcmp(key, event->customer_key) == 0)
		{
			if (v.type != jbvString || text.len == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("meter event customer under key \"%s\" must be a non-empty string",
								key),
						 errdetail("Stripe maps the event to a customer by this id, for example \"cus_NciAYcXfLnqBoz\".")));
			*customer = pstrdup(text.data);
			saw_customer = true;
		}
	}

	if (!saw_customer || !saw_value)
	{
		const char *missing = !saw_customer ? event->customer_key : event->value_key;

		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("meter event payload is missing the key \"%s\"", missing),
				 errdetail("Events named \"%s\" carry the customer under \"%s\" and the value under \"%s\".",
						   event->event_name, event->customer_key, event->value_key),
				 errhint("If this meter uses other payload keys, record them in stripe_meter.meters.")));
	}
	pfree(text.data);
}

/*
 * The usage value: a whole number, zero or more, of at most 15 digits.
 *
 * Stripe documents the value as a positive whole number (v2's
 * payload_invalid_value) and rejects more than 15 significant digits.  One
 * page hints that negative values are summed; since that is unresolved, a
 * negative value is refused here rather than risk an event Stripe rejects
 * after the fact.  Corrections go through cancelling the event instead.
 */
static void
check_value(const char *key, JsonbValue *value)
{
	StringInfoData digits;

	initStringInfo(&digits);
	if (!MeterEventValueText(value, &digits))
	{
		StringInfoData shown;

		initStringInfo(&shown);
		MeterEventScalarText(value, &shown);
		if (shown.data[0] == '-' && value->type == jbvNumeric)
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("meter event value %s is negative", shown.data),
					 errdetail("Stripe accepts whole numbers from 0 to 999999999999999 under key \"%s\".",
							   key),
					 errhint("To correct usage already recorded, cancel the event instead.")));
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("meter event value \"%s\" is not a whole number", shown.data),
				 errdetail("The value under key \"%s\" must be a whole number from 0 to 999999999999999, as a JSON number or a string of digits.",
						   key)));
	}
	if (digits.len > STRIPE_MAX_VALUE_DIGITS)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("meter event value %s has more than %d digits",
						digits.data, STRIPE_MAX_VALUE_DIGITS),
				 errdetail("Stripe rejects values with more than %d significant digits.",
						   STRIPE_MAX_VALUE_DIGITS)));
	pfree(digits.data);
}

/*
 * MeterEventValueText
 *		Append the canonical text of a usage value: decimal digits, no sign,
 *		no leading zeros, no fraction.
 *
 * Returns false when the value is not a whole number of zero or more.  The
 * same text is what goes on the wire, so what was validated is what is sent.
 */
bool
MeterEventValueText(JsonbValue *value, StringInfo out)
{
	const char *s;
	const char *p;
	const char *start;
	const char *end;

	if (value->type == jbvNumeric)
		s = DatumGetCString(DirectFunctionCall1(numeric_out,
												NumericGetDatum(value->val.numeric)));
	else if (value->type == jbvString)
		s = pnstrdup(value->val.string.val, value->val.string.len);
	else
		return false;

	p = s;
	if (*p < '0' || *p > '9')
		return false;
	start = p;
	while (*p >= '0' && *p <= '9')
		p++;
	end = p;

	/* a JSON number may carry a zero fraction (25.0); a string may not */
	if (*p == '.' && value->type == jbvNumeric)
	{
		p++;
		while (*p == '0')
			p++;
	}
	if (*p != '\0')
		return false;

	while (start < end - 1 && *start == '0')
		start++;
	appendBinaryStringInfo(out, start, end - start);
	return true;
}

/*
 * MeterEventCanonicalValue
 *		The canonical text of the usage value under value_key, palloc'd in
 *		the current context.
 *
 * Called once the event has passed MeterEventValidate, which checked that
 * the value is there and is a whole number; the text is stored in the
 * outbox row so that every attempt sends exactly it.
 */
char *
MeterEventCanonicalValue(Jsonb *payload, const char *value_key)
{
	JsonbValue	key;
	JsonbValue *value;
	StringInfoData out;

	key.type = jbvString;
	key.val.string.val = (char *) value_key;
	key.val.string.len = strlen(value_key);
	value = findJsonbValueFromContainer(&payload->root, JB_FOBJECT, &key);
	initStringInfo(&out);
	if (value == NULL || !MeterEventValueText(value, &out))
		elog(ERROR, "meter event value under key \"%s\" was not validated", value_key);
	return out.data;
}

/*
 * MeterEventWireText
 *		Append the text a payload entry is sent as.
 *
 * The entry under value_key is the usage value: sent as canonical_value,
 * the text frozen in the row at enqueue, or, for a row queued before that
 * text was stored (canonical_value NULL), in its canonical form computed
 * now.  Every other entry is sent as its scalar text.
 */
void
MeterEventWireText(const char *key, JsonbValue *value, const char *value_key,
				   const char *canonical_value, StringInfo out)
{
	if (strcmp(key, value_key) == 0)
	{
		if (canonical_value != NULL)
		{
			appendStringInfoString(out, canonical_value);
			return;
		}
		if (MeterEventValueText(value, out))
			return;
		resetStringInfo(out);
	}
	MeterEventScalarText(value, out);
}

/*
 * MeterEventScalarText
 *		Append the text Stripe receives for a scalar payload value: strings
 *		as they are, numbers as their JSON text, booleans as true/false.
 */
void
MeterEventScalarText(JsonbValue *value, StringInfo out)
{
	switch (value->type)
	{
		case jbvString:
			appendBinaryStringInfo(out, value->val.string.val, value->val.string.len);
			break;
		case jbvNumeric:
			appendStringInfoString(out,
								   DatumGetCString(DirectFunctionCall1(numeric_out,
																	   NumericGetDatum(value->val.numeric))));
			break;
		case jbvBool:
			appendStringInfoString(out, value->val.boolean ? "true" : "false");
			break;
		default:
			elog(ERROR, "unexpected jsonb value type %d in a meter event payload",
				 (int) value->type);
	}
}

/*
 * Stripe accepts timestamps from 35 days before it receives the event to 5
 * minutes after.  The window is anchored at enqueue time, which for a new
 * event is now; a restored dump keeps each row's original enqueue time.
 */
static void
check_timestamp(TimestampTz ts, TimestampTz reference)
{
	TimestampTz oldest = reference - (TimestampTz) STRIPE_TS_PAST_LIMIT_SECS * USECS_PER_SEC;
	TimestampTz newest = reference + (TimestampTz) STRIPE_TS_FUTURE_LIMIT_SECS * USECS_PER_SEC;
	char	   *shown;
	char	   *from;
	char	   *to;

	if (TIMESTAMP_NOT_FINITE(ts))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("meter event timestamp must be finite")));
	if (ts >= oldest && ts <= newest)
		return;

	/* timestamptz_to_str returns a static buffer: copy each result */
	shown = pstrdup(timestamptz_to_str(ts));
	from = pstrdup(timestamptz_to_str(oldest));
	to = pstrdup(timestamptz_to_str(newest));
	if (ts < oldest)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("meter event timestamp %s is more than 35 days in the past",
						shown),
				 errdetail("Stripe accepts timestamps from %s to %s.", from, to)));
	ereport(ERROR,
			(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
			 errmsg("meter event timestamp %s is more than 5 minutes in the future",
					shown),
			 errdetail("Stripe accepts timestamps from %s to %s.", from, to)));
}

/*
 * A Connect account id, sent as the Stripe-Account header: "acct_" and
 * letters and digits only, which also keeps it safe inside a header.
 */
static void
check_stripe_account(const char *account)
{
	const char *p;
	bool		ok = strncmp(account, "acct_", 5) == 0 && account[5] != '\0' &&
		strlen(account) <= 255;

	for (p = account + 5; ok && *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
			  (*p >= '0' && *p <= '9')))
			ok = false;
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid Stripe account \"%s\"", account),
				 errdetail("A Connect account id is \"acct_\" followed by letters and digits.")));
}

static const char *
jsonb_value_kind(JsonbValue *value)
{
	switch (value->type)
	{
		case jbvNull:
			return "null";
		case jbvBinary:
			return JsonContainerIsArray(value->val.binary.data) ? "array" : "object";
		case jbvArray:
			return "array";
		case jbvObject:
			return "object";
		default:
			return "scalar";
	}
}

/*
 * MeterEventNewIdentifier
 *		A random (version 4) UUID, Stripe's recommended identifier shape.
 *
 * The bytes come from pg_strong_random() as before, drawn 16 identifiers
 * at a time: each call of the generator has a fixed cost several times
 * that of formatting one UUID, and every queued row without an identifier
 * needs one.  Each byte is used once.
 */
#define IDENTIFIER_BATCH 16

char *
MeterEventNewIdentifier(void)
{
	static uint8 pool[16 * IDENTIFIER_BATCH];
	static int	pool_used = sizeof(pool);
	static const char hex[] = "0123456789abcdef";
	uint8	   *b;
	char	   *out;
	char	   *p;
	int			i;

	if (pool_used >= (int) sizeof(pool))
	{
		if (!pg_strong_random(pool, sizeof(pool)))
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not generate a random meter event identifier")));
		pool_used = 0;
	}
	b = pool + pool_used;
	pool_used += 16;
	b[6] = (b[6] & 0x0f) | 0x40;
	b[8] = (b[8] & 0x3f) | 0x80;

	out = p = palloc(37);
	for (i = 0; i < 16; i++)
	{
		if (i == 4 || i == 6 || i == 8 || i == 10)
			*p++ = '-';
		*p++ = hex[b[i] >> 4];
		*p++ = hex[b[i] & 0x0f];
	}
	*p = '\0';
	explicit_bzero(b, 16);
	return out;
}
