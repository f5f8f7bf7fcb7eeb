/*-------------------------------------------------------------------------
 *
 * delivery_outcome.c
 *	  Decide what one attempt's answer means for its event, following the
 *	  rules Stripe documents for errors, retries and idempotency.  Pure
 *	  functions: no SQL, no curl, no ERROR.
 *
 * In order:
 *	- no answer: retry; if the request may have reached Stripe, the outcome
 *	  is unknown, which bounds how long resends stay safe
 *	- 401/403 (and 404: the URL is wrong): pause delivery, keep the event
 *	- 429: retry and slow the whole sender down; never fail for it
 *	- Stripe-Should-Retry: true retries, false forbids a retry
 *	- 200 with a billing.meter_event: delivered (replayed when Stripe says so)
 *	- 400 "An event already exists with identifier": delivered before
 *	- 409 and 5xx replayed for the key: fail, billing state unknown
 *	- 409 and 5xx: retry (outcome unknown)
 *	- any other 4xx: fail for good, keeping Stripe's error
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/delivery_outcome.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"

#include "stripe_meter.h"

typedef struct StorableCheck
{
	bool		ok;
} StorableCheck;

/* deeper than any answer of Stripe's; the parser recurses per level */
#define MAX_STORABLE_DEPTH	64

static JSON_CALLBACK_RESULT
check_scalar(void *state, char *token, JsonTokenType tokentype)
{
	const char *e;

	if (tokentype != JSON_TOKEN_NUMBER)
		JSON_CALLBACK_DONE;

	/*
	 * numeric input raises an ERROR for absurd numbers (too long, or an
	 * exponent beyond its range such as 1e999999); keep them out of jsonb_in
	 */
	if (strlen(token) > 100)
		((StorableCheck *) state)->ok = false;
	else if ((e = strpbrk(token, "eE")) != NULL)
	{
		long		exponent = strtol(e + 1, NULL, 10);

		if (exponent > 1000 || exponent < -1000)
			((StorableCheck *) state)->ok = false;
	}
	JSON_CALLBACK_DONE;
}

/*
 * True when the JSON text nests objects and arrays at most max_depth deep.
 * The parser checks the stack depth with an ERROR, which the worker must not
 * raise for what a server sent.
 */
static bool
nesting_within(const char *json, size_t len, int max_depth)
{
	int			depth = 0;
	bool		in_string = false;
	size_t		i;

	for (i = 0; i < len; i++)
	{
		char		c = json[i];

		if (in_string)
		{
			if (c == '\\')
				i++;
			else if (c == '"')
				in_string = false;
		}
		else if (c == '"')
			in_string = true;
		else if (c == '{' || c == '[')
		{
			if (++depth > max_depth)
				return false;
		}
		else if (c == '}' || c == ']')
			depth--;
	}
	return true;
}

/*
 * DeliveryJsonIsStorable
 *		True when the text is one JSON object that jsonb_in will accept.
 *
 * The worker has no error handler around jsonb_in: a body it cannot store
 * must be found here, without raising an error.
 */
bool
DeliveryJsonIsStorable(const char *json, size_t len)
{
	JsonLexContext *lex;
	JsonSemAction sem;
	StorableCheck state = {true};
	JsonParseErrorType rc;
	size_t		i = 0;

	while (i < len && (json[i] == ' ' || json[i] == '\t' || json[i] == '\r' || json[i] == '\n'))
		i++;
	if (i == len || json[i] != '{' || memchr(json, '\0', len) != NULL)
		return false;
	if (pg_verify_mbstr(GetDatabaseEncoding(), json, len, true) == false)
		return false;
	if (!nesting_within(json, len, MAX_STORABLE_DEPTH))
		return false;

	memset(&sem, 0, sizeof(sem));
	sem.semstate = &state;
	sem.scalar = check_scalar;
	lex = make_json_lexer(pnstrdup(json, len), len, GetDatabaseEncoding());
	rc = pg_parse_json(lex, &sem);
	return rc == JSON_SUCCESS && state.ok;
}

static char *
body_excerpt(const HttpResult *http)
{
	size_t		n = Min(http->body_len, 200);
	char	   *s = pnstrdup(http->body ? http->body : "", n);
	char	   *p;

	for (p = s; *p; p++)
		if ((unsigned char) *p < 0x20)
			*p = ' ';
	return s;
}

/* Stripe's error message from an error body, if there is one */
static char *
stripe_error_message(const char *json)
{
	const char *m;
	const char *end;
	StringInfoData buf;

	if (json == NULL || (m = strstr(json, "\"message\"")) == NULL)
		return NULL;
	m = strchr(m + 9, '"');
	if (m == NULL)
		return NULL;
	m++;
	initStringInfo(&buf);
	for (end = m; *end && *end != '"' && buf.len < 300; end++)
	{
		if (*end == '\\' && end[1])
			end++;
		appendStringInfoChar(&buf, *end);
	}
	return buf.data;
}

/*
 * DeliveryClassify
 *		Fill in *outcome for one attempt of the event with this identifier.
 */
void
DeliveryClassify(const HttpResult *http, const char *identifier,
				 DeliveryOutcome *outcome)
{
	char	   *message;

	memset(outcome, 0, sizeof(*outcome));
	outcome->http_status = http->status;
	if (http->request_id)
		strlcpy(outcome->request_id, http->request_id, sizeof(outcome->request_id));
	outcome->retry_now = (http->should_retry == 't');

	if (http->curl_code != 0)
	{
		outcome->verdict = VERDICT_RETRY;
		outcome->outcome_unknown = http->connected;
		outcome->reason = psprintf("could not get an answer from Stripe: %s",
								   http->curl_error ? http->curl_error : "transfer failed");
		return;
	}

	if (http->body && !http->body_truncated &&
		DeliveryJsonIsStorable(http->body, http->body_len))
		outcome->response_json = pnstrdup(http->body, http->body_len);
	message = stripe_error_message(outcome->response_json);

	/* the key or the URL is wrong for every event: stop, keep them all */
	if (http->status == 401 || http->status == 403 || http->status == 404)
	{
		outcome->verdict = VERDICT_PAUSE;
		outcome->reason =
			http->status == 401 ?
			psprintf("Stripe rejected the API key (HTTP 401): %s",
					 message ? message : "no message") :
			http->status == 403 ?
			psprintf("the API key may not create meter events (HTTP 403): %s",
					 message ? message : "no message") :
			psprintf("Stripe answered HTTP 404 for the meter events endpoint; check stripe_meter.api_url");
		return;
	}

	/* Stripe's rate limiters run before its idempotency layer: resend */
	if (http->status == 429)
	{
		outcome->verdict = VERDICT_RETRY;
		outcome->rate_limited = true;
		outcome->reason = psprintf("rate limited by Stripe (HTTP 429): %s",
								   message ? message : "no message");
		return;
	}

	if (http->status == 200)
	{
		if (outcome->response_json != NULL &&
			strstr(outcome->response_json, "\"billing.meter_event\"") != NULL)
		{
			outcome->verdict = VERDICT_DELIVERED;
			outcome->delivery = http->replayed ? "replayed" : "created";
			return;
		}
		/* the event was probably created; a resend replays the answer */
		outcome->verdict = VERDICT_RETRY;
		outcome->outcome_unknown = true;
		outcome->reason = psprintf("Stripe answered HTTP 200 without a billing.meter_event: %s",
								   body_excerpt(http));
		return;
	}

	if (http->status == 400 && message != NULL &&
		strncmp(message, "An event already exists with identifier", 39) == 0)
	{
		outcome->verdict = VERDICT_DELIVERED;
		outcome->delivery = "already_existed";
		outcome->response_json = NULL;	/* no object came back */
		return;
	}

	/*
	 * A replayed 5xx or 409: Stripe stored that answer for this key once the
	 * request began to execute, so every resend gets it again until the key
	 * expires, and whether the event was billed cannot be told from here.
	 */
	if (http->replayed && (http->status == 409 || http->status >= 500))
	{
		outcome->verdict = VERDICT_FAIL;
		outcome->outcome_unknown = true;
		outcome->reason = psprintf("billing state unknown: Stripe replays the HTTP %ld it stored for this idempotency key, so no resend can succeed before the key expires, and the event may or may not have been billed: %s",
								   http->status, message ? message : body_excerpt(http));
		return;
	}

	if (http->should_retry == 'f' && (http->status == 409 || http->status >= 500))
	{
		outcome->verdict = VERDICT_FAIL;
		outcome->reason = psprintf("Stripe answered HTTP %ld and said not to retry: %s",
								   http->status, message ? message : body_excerpt(http));
		return;
	}

	if (http->should_retry == 't' || http->status == 409 || http->status >= 500)
	{
		outcome->verdict = VERDICT_RETRY;
		outcome->outcome_unknown = true;
		outcome->reason = psprintf("Stripe answered HTTP %ld: %s", http->status,
								   message ? message : body_excerpt(http));
		return;
	}

	if (http->status >= 400 && http->status < 500 && outcome->response_json != NULL)
	{
		outcome->verdict = VERDICT_FAIL;
		outcome->reason = psprintf("Stripe refused the event (HTTP %ld): %s",
								   http->status, message ? message : "no message");
		return;
	}

	/*
	 * Anything else (a 4xx without Stripe's error body, a redirect, an odd
	 * status) is not Stripe speaking: most likely a proxy.  Retry.
	 */
	outcome->verdict = VERDICT_RETRY;
	outcome->outcome_unknown = true;
	outcome->reason = psprintf("unexpected answer (HTTP %ld): %s", http->status,
							   body_excerpt(http));
}
