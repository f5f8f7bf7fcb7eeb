/*-------------------------------------------------------------------------
 *
 * v2_session.c
 *	  Meter event sessions (API v2), one per Connect account: created with
 *	  POST /v2/billing/meter_event_session (the API key, Stripe-Account
 *	  for a connected account), and renewed before they expire.
 *
 * A session's token authenticates requests to the meter event stream for
 * about 15 minutes.  Its lifetime is taken from Stripe's answer
 * (expires_at - created) and counted on the local clock from the moment
 * the request was sent, so clock skew cannot make a token look fresher
 * than it is.  The next session is asked for a minute (at most a quarter
 * of the lifetime) before the current one expires; the current token is
 * used until then.  A 401 billing_meter_event_session_expired on the
 * stream drops the token at once (V2SessionExpired).
 *
 * The token is a credential: it is kept in memory only, never logged,
 * and wiped when replaced.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/v2_session.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define SESSION_PATH		"/v2/billing/meter_event_session"
#define RENEW_AHEAD_MS		60000	/* ask for the next session this early */
#define EXPIRY_MARGIN_MS	5000	/* stop using a token this early */

static MemoryContext session_cxt = NULL;
static const SenderHooks *session_hooks = NULL;

/* A session creation in flight: which session and when it was sent. */
typedef struct SessionRequest
{
	V2Session  *session;
	TimestampTz sent_at;
} SessionRequest;

void
V2SessionSetup(MemoryContext cxt, const SenderHooks *hooks)
{
	session_cxt = cxt;
	session_hooks = hooks;
}

void
V2SessionInit(V2Session *s, const char *account)
{
	memset(s, 0, sizeof(*s));
	s->account = account ? MemoryContextStrdup(session_cxt, account) : NULL;
}

static void
forget_token(V2Session *s)
{
	if (s->token)
	{
		explicit_bzero(s->token, strlen(s->token));
		pfree(s->token);
	}
	if (s->id)
		pfree(s->id);
	s->token = NULL;
	s->id = NULL;
}

static void
session_done(void *owner, const HttpResult *http)
{
	SessionRequest *req = owner;
	V2Session  *s = req->session;
	MemoryContext tmp = AllocSetContextCreate(session_cxt, "stripe_meter session answer",
											  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(tmp);
	V2SessionAnswer answer;
	DeliveryOutcome outcome;

	s->creating = false;
	if (V2ClassifySession(http, &answer, &outcome))
	{
		int64		renew_ahead = Min(RENEW_AHEAD_MS, answer.lifetime_ms / 4);
		int64		margin = Min(EXPIRY_MARGIN_MS, answer.lifetime_ms / 10);

		forget_token(s);
		s->token = MemoryContextStrdup(session_cxt, answer.token);
		s->id = MemoryContextStrdup(session_cxt, answer.id);
		explicit_bzero(answer.token, strlen(answer.token));
		s->generation++;
		s->expires_at = TimestampTzPlusMilliseconds(req->sent_at,
													answer.lifetime_ms - margin);
		s->renew_at = TimestampTzPlusMilliseconds(req->sent_at,
												  answer.lifetime_ms - renew_ahead);
		s->failures = 0;
		s->retry_at = 0;
		ereport(DEBUG1,
				(errmsg_internal("stripe_meter opened meter event session %s for %s",
								 s->id, s->account ? s->account : "the platform account")));
	}
	else
	{
		s->failures++;
		s->retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												  DeliveryBackoffMs(s->failures));
		session_hooks->session_trouble(s->account, &outcome);
	}
	MemoryContextSwitchTo(old);
	MemoryContextDelete(tmp);
	pfree(req);
}

static void
start_creation(V2Session *s, TimestampTz now)
{
	SessionRequest *req = MemoryContextAlloc(session_cxt, sizeof(SessionRequest));
	StripeRequestSpec spec;

	req->session = s;
	req->sent_at = now;
	memset(&spec, 0, sizeof(spec));
	spec.owner = req;
	spec.done = session_done;
	spec.base_url = stripe_meter_api_url;
	spec.path = SESSION_PATH;
	spec.body = "{}";
	spec.content_type = "application/json";
	spec.stripe_account = s->account;
	if (StripeClientStartRequest(&spec))
		s->creating = true;
	else
	{
		pfree(req);
		s->failures++;
		s->retry_at = TimestampTzPlusMilliseconds(now, DeliveryBackoffMs(s->failures));
	}
}

/*
 * V2SessionHasToken
 *		True when s has a token that has not expired at now.  Only looks.
 */
bool
V2SessionHasToken(const V2Session *s, TimestampTz now)
{
	return s->token != NULL && now < s->expires_at;
}

/*
 * V2SessionUsable
 *		True when s has a token that may be used now.  Starts creating the
 *		next session when one is due.  When false, *wait_ms says when to
 *		look again (-1: when the creation in flight answers).
 */
bool
V2SessionUsable(V2Session *s, TimestampTz now, long *wait_ms)
{
	bool		usable = V2SessionHasToken(s, now);

	*wait_ms = -1;
	if (!usable && s->token != NULL)
		forget_token(s);		/* expired: never send it again */
	if (!s->creating && (s->token == NULL || now >= s->renew_at))
	{
		if (s->retry_at != 0 && now < s->retry_at)
		{
			long		secs;
			int			usecs;

			TimestampDifference(now, s->retry_at, &secs, &usecs);
			*wait_ms = secs * 1000 + usecs / 1000 + 1;
		}
		else
			start_creation(s, now);
	}
	return usable;
}

/*
 * V2SessionFree
 *		The account has been idle: wipe its token and free what the session
 *		holds.  No creation may be in flight (it points at s).
 */
void
V2SessionFree(V2Session *s)
{
	Assert(!s->creating);
	forget_token(s);
	if (s->account)
		pfree(s->account);
	s->account = NULL;
}

/*
 * V2SessionExpired
 *		The stream refused the token of this generation: never use it again.
 *		A newer session (renewed meanwhile) stays.
 */
void
V2SessionExpired(V2Session *s, uint64 generation)
{
	if (s->generation == generation && s->token != NULL)
	{
		forget_token(s);
		s->expires_at = 0;
		s->renew_at = 0;
	}
}
