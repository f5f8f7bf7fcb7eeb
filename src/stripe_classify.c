/*-------------------------------------------------------------------------
 *
 * stripe_classify.c
 *	  The one ladder that turns Stripe's answer to any request (status,
 *	  Stripe-Should-Retry, Idempotent-Replayed, error code) into a verdict,
 *	  following what Stripe documents for errors, retries and idempotency.
 *	  Each endpoint (delivery_outcome.c, v2_outcome.c, cancel.c) says only
 *	  whether the answer is its success, and words its own reasons by the
 *	  rule that decided.  Pure functions: no SQL, no curl, no ERROR.
 *
 * In order:
 *	- no answer: retry; if the request may have reached Stripe, the
 *	  outcome is unknown
 *	- the endpoint's success
 *	- 401 on the v2 stream is about the session token: an expired session
 *	  is renewed and the request resent; any other token is dropped
 *	- 401 and 403 (and 404 from an endpoint that names no object: the URL
 *	  is wrong): pause the Connect account the request named, or everything
 *	- 429, or 400 with code rate_limit (an older form): retry and slow
 *	  down; Stripe's rate limiters run before its idempotency layer, so the
 *	  request was not processed
 *	- 200 without the endpoint's success: retry, outcome unknown (it was
 *	  probably done; a resend with the same key replays the answer)
 *	- 409 or 5xx replayed for the idempotency key: fail, outcome unknown and
 *	  maybe billed (every resend before the key expires gets it again)
 *	- 409 or 5xx with Stripe-Should-Retry: false: fail, maybe billed
 *	- 409 or 5xx, or Stripe-Should-Retry: true: retry, outcome unknown
 *	- any other 4xx in Stripe's error form: fail for good
 *	- anything else is not Stripe speaking (a proxy, a redirect): retry,
 *	  outcome unknown
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/stripe_classify.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "mb/pg_wchar.h"

#include "stripe_meter.h"

/* the most of Stripe's error message a reason quotes (up to 40,000 bytes) */
#define MESSAGE_MAX_BYTES	300

/* Stripe's error message fit for a one-line reason, or NULL */
static char *
reason_message(const StripeResponse *resp)
{
	char	   *m;
	char	   *p;
	int			len;

	if (resp->error_message == NULL)
		return NULL;
	len = strlen(resp->error_message);
	m = pnstrdup(resp->error_message,
				 pg_mbcliplen(resp->error_message, len, Min(len, MESSAGE_MAX_BYTES)));
	for (p = m; *p; p++)
		if ((unsigned char) *p < 0x20)
			*p = ' ';
	return m;
}

/*
 * Whether the body is Stripe's own error answer rather than some other
 * server's: a JSON object for v1, whose error must carry the message that
 * v2's error schema requires.
 */
static bool
stripe_error_form(const StripeResponse *resp, const StripeEndpoint *endpoint)
{
	if (!resp->valid)
		return false;
	return !endpoint->v2 || resp->error_message != NULL;
}

/*
 * StripeClassify
 *		Judge one answer.  success is the endpoint's own check of it; j's
 *		message is palloc'd in the current memory context.
 */
void
StripeClassify(const HttpResult *http, const StripeResponse *resp,
			   const StripeEndpoint *endpoint, bool success,
			   StripeJudgement *j)
{
	long		status = http->status;
	bool		transient = (status == 409 || status >= 500);

	memset(j, 0, sizeof(*j));
	j->retry_now = (http->should_retry == 't');
	j->verdict = STRIPE_RETRY;

	if (http->transport_code != 0)
	{
		j->rule = RULE_NO_ANSWER;
		j->outcome_unknown = http->connected;
		return;
	}
	j->message = reason_message(resp);

	if (success)
	{
		j->verdict = STRIPE_SUCCESS;
		j->rule = RULE_SUCCESS;
		return;
	}

	/* the stream's bearer is a session token, not the API key */
	if (status == 401 && endpoint->session_token)
	{
		if ((resp->error_code != NULL &&
			 strcmp(resp->error_code, "billing_meter_event_session_expired") == 0) ||
			(resp->error_type != NULL &&
			 strcmp(resp->error_type, "temporary_session_expired") == 0))
			j->rule = RULE_SESSION_EXPIRED;
		else
			j->rule = RULE_TOKEN_REFUSED;
		return;
	}

	/* refused for every request like this one: stop, keep the requests */
	if (status == 401 || status == 403 || (status == 404 && !endpoint->names_object))
	{
		j->verdict = http->with_account ? STRIPE_PAUSE_ACCOUNT : STRIPE_PAUSE_ALL;
		j->rule = status == 401 ? RULE_KEY_REFUSED :
			status == 403 ? RULE_FORBIDDEN : RULE_NOT_FOUND;
		return;
	}

	/* an older form of the same: Stripe's libraries treat it as a 429 */
	if (status == 429 ||
		(status == 400 && resp->error_code != NULL &&
		 strcmp(resp->error_code, "rate_limit") == 0))
	{
		j->rule = RULE_RATE_LIMITED;
		j->rate_limited = true;
		return;
	}

	if (status == 200)
	{
		j->rule = RULE_UNCONFIRMED;
		j->outcome_unknown = true;
		return;
	}

	/*
	 * Stripe stored this answer for the key once the request began to
	 * execute: every resend gets it again until the key expires, and
	 * whether the request took effect cannot be told from here.
	 */
	if (http->replayed && transient)
	{
		j->verdict = STRIPE_FAIL;
		j->rule = RULE_REPLAYED_FAILURE;
		j->outcome_unknown = true;
		j->maybe_billed = true;
		return;
	}

	/* it may have taken effect even though Stripe forbids the resend */
	if (http->should_retry == 'f' && transient)
	{
		j->verdict = STRIPE_FAIL;
		j->rule = RULE_NO_RETRY;
		j->maybe_billed = true;
		return;
	}

	if (http->should_retry == 't' || transient)
	{
		j->rule = RULE_TRANSIENT;
		j->outcome_unknown = true;
		return;
	}

	if (status >= 400 && status < 500 && stripe_error_form(resp, endpoint))
	{
		j->verdict = STRIPE_FAIL;
		j->rule = RULE_REFUSED;
		return;
	}

	j->rule = RULE_UNEXPECTED;
	j->outcome_unknown = true;
}

/*
 * StripeAnswerText
 *		A one-line description of an answer, for people: the status and
 *		Stripe's error message when there is one.  Never contains the key.
 */
char *
StripeAnswerText(const HttpResult *http, const StripeResponse *resp)
{
	char	   *message;

	if (http->transport_code != 0)
		return psprintf("could not get an answer from Stripe: %s",
						http->transport_error ? http->transport_error : "transfer failed");
	message = reason_message(resp);
	if (message == NULL)
		return psprintf("Stripe answered HTTP %ld", http->status);
	return psprintf("Stripe answered HTTP %ld: %s", http->status, message);
}

/*
 * StripeFailureText
 *		StripeAnswerText for an answer not yet read.
 */
char *
StripeFailureText(const HttpResult *http)
{
	StripeResponse resp;

	StripeReadAnswer(http, &resp);
	return StripeAnswerText(http, &resp);
}
