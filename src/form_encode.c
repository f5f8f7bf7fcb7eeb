/*-------------------------------------------------------------------------
 *
 * form_encode.c
 *	  Turn a queued event into the exact request Stripe expects.
 *
 * POST /v1/billing/meter_events takes application/x-www-form-urlencoded
 * fields, the payload as deepObject brackets:
 *	event_name=...&payload[KEY]=VALUE&...&identifier=...&timestamp=UNIX
 * Keys and values are percent-encoded (StripeClientAppendEscaped);
 * the brackets stay literal, as Stripe's own SDKs send them.  The output is
 * a pure function of the stored row (the value key and the canonical value
 * were frozen in it at enqueue), so every attempt of an event sends
 * byte-identical parameters, as Stripe's idempotency layer requires.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/form_encode.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/cryptohash.h"
#include "common/sha2.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/*
 * FormEncodeMeterEvent
 *		The form body for one event, palloc'd in the current context.
 *
 * The value under value_key is sent as canonical_value, the text
 * validation produced at enqueue (computed from the payload for a row
 * queued before it was stored: canonical_value NULL); every other payload
 * value as its scalar text.
 */
char *
FormEncodeMeterEvent(const char *event_name, Jsonb *payload,
					 const char *identifier, TimestampTz ts,
					 const char *value_key, const char *canonical_value)
{
	StringInfoData buf;
	StringInfoData text;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	char	   *key = NULL;
	int64		unix_seconds;

	initStringInfo(&buf);
	initStringInfo(&text);

	appendStringInfoString(&buf, "event_name=");
	StripeClientAppendEscaped(&buf, event_name, strlen(event_name));

	it = JsonbIteratorInit(&payload->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			key = pnstrdup(v.val.string.val, v.val.string.len);
			continue;
		}
		if (tok != WJB_VALUE)
			continue;

		resetStringInfo(&text);
		MeterEventWireText(key, &v, value_key, canonical_value, &text);
		appendStringInfoString(&buf, "&payload[");
		StripeClientAppendEscaped(&buf, key, strlen(key));
		appendStringInfoString(&buf, "]=");
		StripeClientAppendEscaped(&buf, text.data, text.len);
		pfree(key);
	}

	appendStringInfoString(&buf, "&identifier=");
	StripeClientAppendEscaped(&buf, identifier, strlen(identifier));

	/* Stripe takes whole unix seconds; round toward the past */
	unix_seconds = (ts - SetEpochTimestamp()) / USECS_PER_SEC;
	if ((ts - SetEpochTimestamp()) % USECS_PER_SEC < 0)
		unix_seconds--;
	appendStringInfo(&buf, "&timestamp=" INT64_FORMAT, unix_seconds);

	pfree(text.data);
	return buf.data;
}

/*
 * append_key
 *		Append prefix and the identifier when the identifier is safe in a
 *		header (printable ASCII, no spaces), else hashed_prefix and the
 *		SHA-256 of the identifier in hex, so a key depends on the
 *		identifier alone and stays the same across crashes and restarts.
 */
static char *
append_key(const char *prefix, const char *hashed_prefix, const char *identifier)
{
	const unsigned char *p;
	pg_cryptohash_ctx *ctx;
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	StringInfoData key;
	int			i;

	initStringInfo(&key);
	for (p = (const unsigned char *) identifier; *p; p++)
		if (*p <= 0x20 || *p >= 0x7f)
			break;
	if (*p == '\0')
	{
		appendStringInfo(&key, "%s%s", prefix, identifier);
		return key.data;
	}

	ctx = pg_cryptohash_create(PG_SHA256);
	if (ctx == NULL ||
		pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) identifier, strlen(identifier)) < 0 ||
		pg_cryptohash_final(ctx, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not compute an idempotency key");
	pg_cryptohash_free(ctx);

	appendStringInfoString(&key, hashed_prefix);
	for (i = 0; i < PG_SHA256_DIGEST_LENGTH; i++)
		appendStringInfo(&key, "%02x", digest[i]);
	return key.data;
}

/*
 * FormEncodeIdempotencyKey
 *		The Idempotency-Key for every attempt of a request of the given kind
 *		(IDEMPOTENCY_KIND_EVENT or IDEMPOTENCY_KIND_ADJUSTMENT) for an
 *		identifier.
 *
 * "KIND:identifier", or "KIND_sha256:HEX" for an identifier unsafe in a
 * header.  Stripe compares a resend's parameters with the first request
 * under its key, so an event and a cancellation must never share one: the
 * kinds are chosen so that no key of one kind starts like a key of another
 * (the character after "meter_event" is ':' for events, '_' for the
 * others), whatever the identifiers.  Stripe allows keys of 255
 * characters; the longest made here has 23 + 100 (identifiers are at most
 * 100 characters, and only ASCII ones are used as they are).
 */
char *
FormEncodeIdempotencyKey(const char *kind, const char *identifier)
{
	return append_key(psprintf("%s:", kind), psprintf("%s_sha256:", kind),
					  identifier);
}

/*
 * FormEncodeLegacyIdempotencyKey
 *		The key 0.1.0 sent for an event: its bare identifier, or
 *		"stripe-meter-sha256-HEX".  Only for events attempted before the
 *		update to 0.2.0 (outbox.legacy_idempotency_key), whose resends must
 *		repeat the key Stripe may have stored.
 */
char *
FormEncodeLegacyIdempotencyKey(const char *identifier)
{
	return append_key("", "stripe-meter-sha256-", identifier);
}
