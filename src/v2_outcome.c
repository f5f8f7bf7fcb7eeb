/*-------------------------------------------------------------------------
 *
 * v2_outcome.c
 *	  Decide what an answer of Stripe's API v2 meter endpoints means: the
 *	  session endpoint and the meter event stream.  Pure functions: no SQL, no curl, no
 *	  ERROR (they run outside any transaction).
 *
 * The stream answers a whole batch at once and validates events only
 * later, asynchronously: a 200 ({}) means Stripe accepted every event of
 * the request; per-event problems (no meter, unknown customer, ...) come
 * back hours later as error reports, never in this answer.  So:
 *	- no answer: retry the events; if the request may have reached Stripe
 *	  the outcome is unknown (Stripe dedupes a resend by identifier)
 *	- 200: every event accepted
 *	- 401 billing_meter_event_session_expired: nothing was processed;
 *	  renew the session and resend at once
 *	- any other 401: the token was refused; drop the session, retry later
 *	- 403, 404: pause delivery (the key may not do this, or the URL is wrong)
 *	- 429 (rate limit, too_many_concurrent_requests): retry, slow down
 *	- 409, 5xx: retry (outcome unknown), unless Stripe-Should-Retry: false
 *	- any other 4xx with Stripe's error body: the request as sent is
 *	  refused; the caller isolates the event at fault
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/v2_outcome.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/* Grab scalar fields of a JSON object: "name" or "outer.name", depth <= 2. */
typedef struct FieldGrab
{
	const char *const *paths;
	char	  **values;
	int			npaths;
	int			depth;
	int			array_depth;
	char	   *field[3];
} FieldGrab;

static JSON_CALLBACK_RESULT
grab_object_start(void *state)
{
	((FieldGrab *) state)->depth++;
	JSON_CALLBACK_DONE;
}

static JSON_CALLBACK_RESULT
grab_object_end(void *state)
{
	((FieldGrab *) state)->depth--;
	JSON_CALLBACK_DONE;
}

static JSON_CALLBACK_RESULT
grab_array_start(void *state)
{
	((FieldGrab *) state)->array_depth++;
	JSON_CALLBACK_DONE;
}

static JSON_CALLBACK_RESULT
grab_array_end(void *state)
{
	((FieldGrab *) state)->array_depth--;
	JSON_CALLBACK_DONE;
}

static JSON_CALLBACK_RESULT
grab_field_start(void *state, char *fname, bool isnull)
{
	FieldGrab  *g = state;

	if (g->depth >= 1 && g->depth <= 2)
		g->field[g->depth] = fname;
	JSON_CALLBACK_DONE;
}

static JSON_CALLBACK_RESULT
grab_scalar(void *state, char *token, JsonTokenType tokentype)
{
	FieldGrab  *g = state;
	char		path[256];
	int			i;

	if (g->array_depth > 0 || g->depth < 1 || g->depth > 2 || token == NULL)
		JSON_CALLBACK_DONE;
	if (g->depth == 1)
		snprintf(path, sizeof(path), "%s", g->field[1]);
	else
		snprintf(path, sizeof(path), "%s.%s", g->field[1], g->field[2]);
	for (i = 0; i < g->npaths; i++)
		if (strcmp(path, g->paths[i]) == 0 && g->values[i] == NULL)
			g->values[i] = pstrdup(token);
	JSON_CALLBACK_DONE;
}

/*
 * Fill values[i] with the scalar at paths[i] of the JSON object in json
 * (NULL when absent).  Returns false when json is not a storable object.
 */
static bool
json_grab(const char *json, size_t len, const char *const *paths, char **values,
		  int npaths)
{
	FieldGrab	g;
	JsonSemAction sem;
	JsonLexContext *lex;

	memset(values, 0, sizeof(char *) * npaths);
	if (json == NULL || !DeliveryJsonIsStorable(json, len))
		return false;
	memset(&g, 0, sizeof(g));
	g.paths = paths;
	g.values = values;
	g.npaths = npaths;
	memset(&sem, 0, sizeof(sem));
	sem.semstate = &g;
	sem.object_start = grab_object_start;
	sem.object_end = grab_object_end;
	sem.array_start = grab_array_start;
	sem.array_end = grab_array_end;
	sem.object_field_start = grab_field_start;
	sem.scalar = grab_scalar;
	lex = make_json_lexer(pnstrdup(json, len), len, GetDatabaseEncoding());
	return pg_parse_json(lex, &sem) == JSON_SUCCESS;
}

/*
 * Parse an RFC 3339 date-time ("2026-01-01T00:00:00.123Z", an offset
 * instead of Z allowed).  Returns false if it is not one.
 */
static bool
parse_rfc3339(const char *s, TimestampTz *out)
{
	struct pg_tm tm;
	int			n = 0;
	fsec_t		fsec = 0;
	int			tz = 0;
	const char *p;

	memset(&tm, 0, sizeof(tm));
	if (s == NULL ||
		sscanf(s, "%4d-%2d-%2d%*1[Tt ]%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon,
			   &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &n) != 6 || n == 0)
		return false;
	p = s + n;
	if (*p == '.')
	{
		int			scale = 100000;

		for (p++; *p >= '0' && *p <= '9'; p++)
		{
			fsec += (*p - '0') * scale;
			scale /= 10;
		}
	}
	if (*p == 'Z' || *p == 'z')
		p++;
	else if (*p == '+' || *p == '-')
	{
		int			hh,
					mm;

		if (sscanf(p + 1, "%2d:%2d", &hh, &mm) != 2)
			return false;
		tz = (hh * 3600 + mm * 60) * (*p == '+' ? -1 : 1);
		p += 6;
	}
	else
		return false;
	if (*p != '\0')
		return false;
	return tm2timestamp(&tm, fsec, &tz, out) == 0;
}

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
	static const char *const paths[] = {"object", "id", "authentication_token",
	"created", "expires_at", "error.code", "error.message"};
	char	   *v[lengthof(paths)];
	TimestampTz created,
				expires;

	memset(outcome, 0, sizeof(*outcome));
	memset(session, 0, sizeof(*session));
	outcome->http_status = http->status;
	if (http->request_id)
		strlcpy(outcome->request_id, http->request_id, sizeof(outcome->request_id));

	if (http->curl_code != 0)
	{
		outcome->verdict = VERDICT_RETRY;
		outcome->reason = psprintf("could not create a meter event session: %s",
								   http->curl_error ? http->curl_error : "transfer failed");
		return false;
	}
	(void) json_grab(http->body_truncated ? NULL : http->body, http->body_len,
					 paths, v, lengthof(paths));

	if (http->status == 200 && v[0] && strcmp(v[0], "v2.billing.meter_event_session") == 0 &&
		v[1] && v[2] && v[2][0] != '\0' &&
		parse_rfc3339(v[3], &created) && parse_rfc3339(v[4], &expires) &&
		expires > created)
	{
		session->id = v[1];
		session->token = v[2];
		session->lifetime_ms = (expires - created) / 1000;
		return true;
	}

	if (http->status == 401 || http->status == 403 || http->status == 404)
	{
		outcome->verdict = VERDICT_PAUSE;
		outcome->reason =
			http->status == 401 ?
			psprintf("Stripe rejected the API key creating a meter event session (HTTP 401): %s",
					 v[6] ? v[6] : "no message") :
			http->status == 403 ?
			psprintf("the API key may not create meter event sessions (HTTP 403): %s",
					 v[6] ? v[6] : "no message") :
			pstrdup("Stripe answered HTTP 404 for the meter event session endpoint; check stripe_meter.api_url");
		return false;
	}
	outcome->verdict = VERDICT_RETRY;
	outcome->rate_limited = (http->status == 429);
	outcome->reason = psprintf("could not create a meter event session (HTTP %ld): %s",
							   http->status, v[6] ? v[6] : "unexpected answer");
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
	static const char *const paths[] = {"error.code", "error.message", "error.type"};
	char	   *v[lengthof(paths)];
	bool		is_json;
	const char *message;

	memset(outcome, 0, sizeof(*outcome));
	outcome->http_status = http->status;
	if (http->request_id)
		strlcpy(outcome->request_id, http->request_id, sizeof(outcome->request_id));
	outcome->retry_now = (http->should_retry == 't');

	if (http->curl_code != 0)
	{
		outcome->verdict = VERDICT_RETRY;
		outcome->outcome_unknown = http->connected;
		outcome->reason = psprintf("could not get an answer from the meter event stream: %s",
								   http->curl_error ? http->curl_error : "transfer failed");
		return V2_STREAM_OTHER;
	}

	is_json = json_grab(http->body_truncated ? NULL : http->body, http->body_len,
						paths, v, lengthof(paths));
	if (is_json)
		outcome->response_json = pnstrdup(http->body, http->body_len);
	message = v[1] ? v[1] : "no message";

	if (http->status == 200 && is_json)
	{
		outcome->verdict = VERDICT_DELIVERED;
		outcome->delivery = "accepted";
		outcome->response_json = NULL;	/* {}: nothing worth keeping */
		return V2_STREAM_ACCEPTED;
	}

	if (http->status == 401)
	{
		if ((v[0] && strcmp(v[0], "billing_meter_event_session_expired") == 0) ||
			(v[2] && strcmp(v[2], "temporary_session_expired") == 0))
			return V2_STREAM_SESSION_EXPIRED;
		outcome->verdict = VERDICT_RETRY;
		outcome->reason = psprintf("the meter event stream refused the session token (HTTP 401): %s",
								   message);
		return V2_STREAM_TOKEN_REFUSED;
	}

	if (http->status == 403 || http->status == 404)
	{
		outcome->verdict = VERDICT_PAUSE;
		outcome->reason = http->status == 403 ?
			psprintf("the meter event stream refused the request (HTTP 403): %s", message) :
			pstrdup("Stripe answered HTTP 404 for the meter event stream; check stripe_meter.stream_url");
		return V2_STREAM_OTHER;
	}

	if (http->status == 429)
	{
		outcome->verdict = VERDICT_RETRY;
		outcome->rate_limited = true;
		outcome->reason = psprintf("rate limited by the meter event stream (HTTP 429): %s", message);
		return V2_STREAM_OTHER;
	}

	if (http->should_retry == 'f' && (http->status == 409 || http->status >= 500))
	{
		outcome->verdict = VERDICT_FAIL;
		outcome->reason = psprintf("the meter event stream answered HTTP %ld and said not to retry: %s",
								   http->status, message);
		return V2_STREAM_REFUSED;
	}

	if (http->should_retry == 't' || http->status == 409 || http->status >= 500 ||
		(http->status == 200 && !is_json))
	{
		outcome->verdict = VERDICT_RETRY;
		outcome->outcome_unknown = true;
		outcome->reason = psprintf("the meter event stream answered HTTP %ld: %s", http->status,
								   is_json ? message : "an unexpected body");
		return V2_STREAM_OTHER;
	}

	if (http->status >= 400 && http->status < 500 && is_json && v[1] != NULL)
	{
		outcome->verdict = VERDICT_FAIL;
		outcome->reason = psprintf("the meter event stream refused the event (HTTP %ld, %s): %s",
								   http->status, v[0] ? v[0] : "no code", message);
		return V2_STREAM_REFUSED;
	}

	/* not Stripe speaking (a proxy, a redirect): retry */
	outcome->verdict = VERDICT_RETRY;
	outcome->outcome_unknown = true;
	outcome->reason = psprintf("unexpected answer from the meter event stream (HTTP %ld)",
							   http->status);
	return V2_STREAM_OTHER;
}
