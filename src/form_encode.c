/*-------------------------------------------------------------------------
 *
 * form_encode.c
 *	  Turn a queued event into the exact request Stripe expects.
 *
 * POST /v1/billing/meter_events takes application/x-www-form-urlencoded
 * fields, the payload as deepObject brackets:
 *	event_name=...&payload[KEY]=VALUE&...&identifier=...&timestamp=UNIX
 * Keys and values are percent-encoded by libcurl (through stripe_client.c);
 * the brackets stay literal, as Stripe's own SDKs send them.  The output is
 * a pure function of the stored row, so every attempt of an event sends
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
 * The value under value_key is sent in its canonical integer form (what
 * validation checked); every other payload value as its scalar text.
 */
char *
FormEncodeMeterEvent(const char *event_name, Jsonb *payload,
					 const char *identifier, TimestampTz ts,
					 const char *value_key)
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
		if (strcmp(key, value_key) != 0 || !MeterEventValueText(&v, &text))
		{
			resetStringInfo(&text);
			MeterEventScalarText(&v, &text);
		}
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
 * FormEncodeIdempotencyKey
 *		The Idempotency-Key for every attempt of an event.
 *
 * The identifier itself when it is safe in a header (printable ASCII, no
 * spaces); otherwise a SHA-256 of it, so a key is always derived from the
 * identifier alone and stays the same across crashes and restarts.
 */
char *
FormEncodeIdempotencyKey(const char *identifier)
{
	const unsigned char *p;
	pg_cryptohash_ctx *ctx;
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	StringInfoData key;
	int			i;

	for (p = (const unsigned char *) identifier; *p; p++)
		if (*p <= 0x20 || *p >= 0x7f)
			break;
	if (*p == '\0')
		return pstrdup(identifier);

	ctx = pg_cryptohash_create(PG_SHA256);
	if (ctx == NULL ||
		pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) identifier, strlen(identifier)) < 0 ||
		pg_cryptohash_final(ctx, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not compute an idempotency key");
	pg_cryptohash_free(ctx);

	initStringInfo(&key);
	appendStringInfoString(&key, "stripe-meter-sha256-");
	for (i = 0; i < PG_SHA256_DIGEST_LENGTH; i++)
		appendStringInfo(&key, "%02x", digest[i]);
	return key.data;
}
