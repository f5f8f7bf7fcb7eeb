/*-------------------------------------------------------------------------
 *
 * v2_outcome.c
 *	  What an answer of Stripe's API v2 meter endpoints means: the session
 *	  endpoint and the meter event stream.  Each endpoint's success check
 *	  and reasons; the ladder itself (retry, fail, pause) is
 *	  stripe_classify.c's.  Pure functions: no SQL, no curl, no ERROR
 *	  (they run outside any transaction).
 *
 * The stream answers a whole batch at once and validates events only
 * later, asynchronously: a 200 ({}) means Stripe accepted every event of
 * the request; per-event problems (no meter, unknown customer, ...) come
 * back hours later as error reports, never in this answer.  Its bearer is
 * the session's token, so a 401 is about the session: an expired one is
 * renewed and the batch resent at once, any other is dropped.  A 4xx in
 * Stripe's error form refuses the request as sent: the caller isolates
 * the event at fault.
 *
 * A session is created when Stripe answers 200 with a
 * v2.billing.meter_event_session carrying an id, a token and the times
 * that give its lifetime; what else the ladder says is retried later,
 * unless it pauses.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/v2_outcome.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "stripe_meter.h"

/* the API key; Stripe-Account for a Connect account */
static const StripeEndpoint v2_session_endpoint = {
	.v2 = true,
	.session_token = false,
	.names_object = false,
};

/* the session's token; no Idempotency-Key (Stripe dedupes by identifier) */
static const StripeEndpoint v2_stream_endpoint = {
	.v2 = true,
	.session_token = true,
	.names_object = false,
};

/*
 * V2ClassifySession
 *		The answer to POST /v2/billing/meter_event_session.  On success
 *		fills *session (strings palloc'd) and returns true; otherwise fills
 *		*outcome with RETRY (rate_limited on 429) or PAUSE, and returns false.
 */
bool
V2ClassifySession(const HttpResult *http, V2SessionAnswer *session,
				  DeliveryOutcome *outcome)
{
	StripeResponse resp;
	StripeJudgement j;
	TimestampTz created,
				expires;
	bool		opened;

	memset(outcome, 0, sizeof(*outcome));
	memset(session, 0, sizeof(*session));
	outcome->http_status = http->status;
	if (http->request_id)
		strlcpy(outcome->request_id, http->request_id, sizeof(outcome->request_id));

	StripeReadAnswer(http, &resp);
	opened = http->status == 200 && resp.object != NULL &&
		strcmp(resp.object, "v2.billing.meter_event_session") == 0 &&
		resp.id != NULL && resp.authentication_token != NULL &&
		resp.authentication_token[0] != '\0' &&
		StripeParseRfc3339(resp.created, &created) &&
		StripeParseRfc3339(resp.expires_at, &expires) &&
		expires > created;
	StripeClassify(http, &resp, &v2_session_endpoint, opened, &j);

	switch (j.rule)
	{
		case RULE_SUCCESS:
			session->id = resp.id;
			session->token = resp.authentication_token;
			session->lifetime_ms = (expires - created) / 1000;
			return true;
		case RULE_NO_ANSWER:
			outcome->verdict = VERDICT_RETRY;
			outcome->reason = psprintf("could not create a meter event session: %s",
									   http->transport_error ? http->transport_error : "transfer failed");
			break;
		case RULE_KEY_REFUSED:
			outcome->verdict = VERDICT_PAUSE;
			outcome->reason = psprintf("Stripe rejected the API key creating a meter event session (HTTP 401): %s",
									   j.message ? j.message : "no message");
			break;
		case RULE_FORBIDDEN:
			outcome->verdict = VERDICT_PAUSE;
			outcome->reason = psprintf("the API key may not create meter event sessions (HTTP 403): %s",
									   j.message ? j.message : "no message");
			break;
		case RULE_NOT_FOUND:
			outcome->verdict = VERDICT_PAUSE;
			outcome->reason = pstrdup("Stripe answered HTTP 404 for the meter event session endpoint; check stripe_meter.api_url");
			break;
		default:
			/* nothing to fail: a session is asked for again later */
			outcome->verdict = VERDICT_RETRY;
			outcome->rate_limited = j.rate_limited;
			outcome->reason = psprintf("could not create a meter event session (HTTP %ld): %s",
									   http->status, j.message ? j.message : "unexpected answer");
			break;
	}
	if (resp.authentication_token != NULL)
		explicit_bzero(resp.authentication_token, strlen(resp.authentication_token));
	return false;
}

/*
 * V2ClassifyStream
 *		The answer to one POST /v2/billing/meter_event_stream; *outcome is
 *		what every event of the batch gets, for V2_STREAM_OTHER and
 *		V2_STREAM_REFUSED (strings palloc'd in the current context).
 */
V2StreamVerdict
V2ClassifyStream(const HttpResult *http, DeliveryOutcome *outcome)
{
	StripeResponse resp;
	StripeJudgement j;
	const char *message;

	memset(outcome, 0, sizeof(*outcome));
	outcome->http_status = http->status;
	if (http->request_id)
		strlcpy(outcome->request_id, http->request_id, sizeof(outcome->request_id));

	StripeReadAnswer(http, &resp);
	StripeClassify(http, &resp, &v2_stream_endpoint,
				   http->status == 200 && resp.valid, &j);
	outcome->retry_now = j.retry_now;
	outcome->rate_limited = j.rate_limited;
	outcome->outcome_unknown = j.outcome_unknown;
	outcome->maybe_billed = j.maybe_billed;
	if (resp.valid)
		outcome->response_json = pnstrdup(http->body, http->body_len);
	message = j.message ? j.message : "no message";

	switch (j.rule)
	{
		case RULE_SUCCESS:
			outcome->verdict = VERDICT_DELIVERED;
			outcome->delivery = "accepted";
			outcome->response_json = NULL;	/* {}: nothing worth keeping */
			return V2_STREAM_ACCEPTED;
		case RULE_SESSION_EXPIRED:
			return V2_STREAM_SESSION_EXPIRED;
		case RULE_TOKEN_REFUSED:
			outcome->verdict = VERDICT_RETRY;
			outcome->reason = psprintf("the meter event stream refused the session token (HTTP 401): %s",
									   message);
			return V2_STREAM_TOKEN_REFUSED;
		case RULE_NO_ANSWER:
			outcome->verdict = VERDICT_RETRY;
			outcome->reason = psprintf("could not get an answer from the meter event stream: %s",
									   http->transport_error ? http->transport_error : "transfer failed");
			return V2_STREAM_OTHER;
		case RULE_KEY_REFUSED:
			/* not on the stream, whose 401 is about the session token */
		case RULE_FORBIDDEN:
			outcome->verdict = VERDICT_PAUSE;
			outcome->reason = psprintf("the meter event stream refused the request (HTTP %ld): %s",
									   http->status, message);
			return V2_STREAM_OTHER;
		case RULE_NOT_FOUND:
			outcome->verdict = VERDICT_PAUSE;
			outcome->reason = pstrdup("Stripe answered HTTP 404 for the meter event stream; check stripe_meter.stream_url");
			return V2_STREAM_OTHER;
		case RULE_RATE_LIMITED:
			outcome->verdict = VERDICT_RETRY;
			outcome->reason = psprintf("rate limited by the meter event stream (HTTP 429): %s", message);
			return V2_STREAM_OTHER;
		case RULE_UNCONFIRMED:
		case RULE_TRANSIENT:
			outcome->verdict = VERDICT_RETRY;
			outcome->reason = psprintf("the meter event stream answered HTTP %ld: %s", http->status,
									   resp.valid ? message : "an unexpected body");
			return V2_STREAM_OTHER;
		case RULE_REPLAYED_FAILURE:
			/* the stream sends no Idempotency-Key, so none is replayed */
		case RULE_NO_RETRY:
			outcome->verdict = VERDICT_FAIL;
			outcome->reason = psprintf("the meter event stream answered HTTP %ld and said not to retry: %s",
									   http->status, message);
			return V2_STREAM_REFUSED;
		case RULE_REFUSED:
			outcome->verdict = VERDICT_FAIL;
			outcome->reason = psprintf("the meter event stream refused the event (HTTP %ld, %s): %s",
									   http->status, resp.error_code ? resp.error_code : "no code",
									   message);
			return V2_STREAM_REFUSED;
		case RULE_UNEXPECTED:
			break;
	}
	outcome->verdict = VERDICT_RETRY;
	outcome->reason = psprintf("unexpected answer from the meter event stream (HTTP %ld)",
							   http->status);
	return V2_STREAM_OTHER;
}
