/*-------------------------------------------------------------------------
 *
 * delivery_outcome.c
 *	  What one attempt's answer means for its event on the v1 endpoint
 *	  (POST /v1/billing/meter_events): its success check and the reasons,
 *	  in the words people read in last_error and failed_events.  The ladder
 *	  itself (retry, fail, pause) is stripe_classify.c's.  Pure functions:
 *	  no SQL, no curl, no ERROR.
 *
 * Success is either of:
 *	- 200 with a billing.meter_event: delivered (replayed when Stripe says
 *	  so); the object is kept
 *	- 400 "An event already exists with identifier": delivered before, by
 *	  an attempt whose answer was lost; no object comes back
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/delivery_outcome.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "mb/pg_wchar.h"

#include "stripe_meter.h"

#define BODY_EXCERPT_BYTES 200

/* Idempotency-Key on every attempt; Stripe-Account for a Connect account */
static const StripeEndpoint v1_meter_events = {
	.v2 = false,
	.session_token = false,
	.names_object = false,
};

/*
 * The start of a body that is not Stripe's JSON (a proxy's HTML page, say),
 * for the reason stored with the event.  The body is bytes in no declared
 * encoding and the reason is text in the database's: in a UTF8 database the
 * excerpt keeps the body's valid UTF-8, cut at a character boundary; in any
 * other it keeps ASCII and shows '?' for every other byte, so that no byte
 * sequence the encoding cannot hold is ever stored.
 */
static char *
body_excerpt(const HttpResult *http)
{
	const char *body = http->body ? http->body : "";
	int			n = (int) Min(http->body_len, BODY_EXCERPT_BYTES);
	bool		utf8 = (GetDatabaseEncoding() == PG_UTF8);
	char	   *s;
	char	   *p;

	if (utf8)
		n = pg_encoding_verifymbstr(PG_UTF8, body, n);
	s = pnstrdup(body, n);
	for (p = s; *p; p++)
	{
		if ((unsigned char) *p < 0x20)
			*p = ' ';
		else if (!utf8 && IS_HIGHBIT_SET(*p))
			*p = '?';
	}
	return s;
}

/*
 * DeliveryClassify
 *		Fill in *outcome for one attempt of the event with this identifier.
 */
void
DeliveryClassify(const HttpResult *http, const char *identifier,
				 DeliveryOutcome *outcome)
{
	StripeResponse resp;
	StripeJudgement j;
	bool		created;
	bool		existed;
	const char *message;

	memset(outcome, 0, sizeof(*outcome));
	outcome->http_status = http->status;
	if (http->request_id)
		strlcpy(outcome->request_id, http->request_id, sizeof(outcome->request_id));

	StripeReadAnswer(http, &resp);
	created = http->status == 200 && resp.object != NULL &&
		strcmp(resp.object, "billing.meter_event") == 0;
	existed = http->status == 400 && resp.error_message != NULL &&
		strncmp(resp.error_message, "An event already exists with identifier", 39) == 0;
	StripeClassify(http, &resp, &v1_meter_events, created || existed, &j);

	outcome->retry_now = j.retry_now;
	outcome->rate_limited = j.rate_limited;
	outcome->outcome_unknown = j.outcome_unknown;
	outcome->maybe_billed = j.maybe_billed;
	if (resp.valid)
		outcome->response_json = pnstrdup(http->body, http->body_len);
	message = j.message;

	switch (j.verdict)
	{
		case STRIPE_SUCCESS:
			outcome->verdict = VERDICT_DELIVERED;
			break;
		case STRIPE_RETRY:
			outcome->verdict = VERDICT_RETRY;
			break;
		case STRIPE_FAIL:
			outcome->verdict = VERDICT_FAIL;
			break;
		case STRIPE_PAUSE_ACCOUNT:
		case STRIPE_PAUSE_ALL:
			/* the worker pauses the event's account, or everything */
			outcome->verdict = VERDICT_PAUSE;
			break;
	}

	switch (j.rule)
	{
		case RULE_SUCCESS:
			if (created)
				outcome->delivery = http->replayed ? "replayed" : "created";
			else
			{
				outcome->delivery = "already_existed";
				outcome->response_json = NULL;	/* no object came back */
			}
			break;
		case RULE_NO_ANSWER:
			outcome->reason = psprintf("could not get an answer from Stripe: %s",
									   http->transport_error ? http->transport_error : "transfer failed");
			break;
		case RULE_KEY_REFUSED:
			outcome->reason = psprintf("Stripe rejected the API key (HTTP 401): %s",
									   message ? message : "no message");
			break;
		case RULE_FORBIDDEN:
			outcome->reason = psprintf("the API key may not create meter events (HTTP 403): %s",
									   message ? message : "no message");
			break;
		case RULE_NOT_FOUND:
			outcome->reason = pstrdup("Stripe answered HTTP 404 for the meter events endpoint; check stripe_meter.api_url");
			break;
		case RULE_RATE_LIMITED:
			outcome->reason = psprintf("rate limited by Stripe (HTTP %ld): %s",
									   http->status, message ? message : "no message");
			break;
		case RULE_UNCONFIRMED:
			outcome->reason = psprintf("Stripe answered HTTP 200 without a billing.meter_event: %s",
									   body_excerpt(http));
			break;
		case RULE_REPLAYED_FAILURE:
			outcome->reason = psprintf("billing state unknown: Stripe replays the HTTP %ld it stored for this idempotency key, so no resend can succeed before the key expires, and the event may or may not have been billed: %s",
									   http->status, message ? message : body_excerpt(http));
			break;
		case RULE_NO_RETRY:
			outcome->reason = psprintf("Stripe answered HTTP %ld and said not to retry: %s",
									   http->status, message ? message : body_excerpt(http));
			break;
		case RULE_TRANSIENT:
			outcome->reason = psprintf("Stripe answered HTTP %ld: %s", http->status,
									   message ? message : body_excerpt(http));
			break;
		case RULE_REFUSED:
			outcome->reason = psprintf("Stripe refused the event (HTTP %ld): %s",
									   http->status, message ? message : "no message");
			break;
		case RULE_SESSION_EXPIRED:
		case RULE_TOKEN_REFUSED:
			/* not on v1, which authenticates with the key */
		case RULE_UNEXPECTED:
			outcome->reason = psprintf("unexpected answer (HTTP %ld): %s", http->status,
									   body_excerpt(http));
			break;
	}
}
