/*-------------------------------------------------------------------------
 *
 * guc.c
 *	  Every stripe_meter.* setting, with the checks that make a bad value
 *	  fail at reload rather than at delivery time.
 *
 * The API key is special: it is superuser-only, left out of SHOW ALL, and
 * shown masked even to superusers.  Its check hook never rejects a value
 * (PostgreSQL would quote it in the error) and replaces what the GUC stores
 * with a fixed token, keeping the key itself in the hook's private "extra":
 * a reload that changes a setting logs "parameter ... changed to <value>"
 * only when the stored value changed, which the token never does.  So the
 * key never reaches the log, pg_settings or an error.  A malformed key is
 * reported by the worker, without the key.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/guc.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/guc.h"

#include "stripe_meter.h"

bool		stripe_meter_enabled = true;
char	   *stripe_meter_api_key = NULL;	/* the real key; see check_api_key */
static char *api_key_token = NULL;	/* what the GUC machinery stores */
char	   *stripe_meter_api_url = NULL;
char	   *stripe_meter_stripe_version = NULL;
char	   *stripe_meter_ca_file = NULL;
int			stripe_meter_max_in_flight = 512;
bool		stripe_meter_http2 = true;
int			stripe_meter_max_connections = 0;
int			stripe_meter_connect_timeout = 10000;
int			stripe_meter_request_timeout = 30000;
int			stripe_meter_retry_min_delay = 500;
int			stripe_meter_retry_max_delay = 60000;
int			stripe_meter_rate_limit = -1;
int			stripe_meter_claim_batch_size = 1000;
int			stripe_meter_naptime = 5000;
int			stripe_meter_rollup_settle_delay = 5000;
int			stripe_meter_resend_window = 23 * 3600;
int			stripe_meter_account_retry_interval = 600;
int			stripe_meter_delivered_retention = 7 * 24 * 60;
int			stripe_meter_max_databases = 16;
int			stripe_meter_launcher_naptime = 10000;
int			stripe_meter_api_version = STRIPE_API_V1;
char	   *stripe_meter_stream_url = NULL;
int			stripe_meter_unknown_meter = UNKNOWN_METER_ERROR;
int			stripe_meter_meter_sync_interval = 0;
int			stripe_meter_error_poll_interval = 300;

static const struct config_enum_entry api_version_options[] = {
	{"v1", STRIPE_API_V1, false},
	{"v2", STRIPE_API_V2, false},
	{NULL, 0, false}
};

static const struct config_enum_entry unknown_meter_options[] = {
	{"error", UNKNOWN_METER_ERROR, false},
	{"warning", UNKNOWN_METER_WARNING, false},
	{NULL, 0, false}
};

static bool check_api_url(char **newval, void **extra, GucSource source);
static bool check_ca_file(char **newval, void **extra, GucSource source);
static bool check_delivered_retention(int *newval, void **extra, GucSource source);
static bool check_api_key(char **newval, void **extra, GucSource source);
static void assign_api_key(const char *newval, void *extra);
static const char *show_api_key(void);

#define API_KEY_TOKEN "********"

/*
 * StripeMeterUrlIsAllowed
 *		https to anywhere; plain http only to a loopback address.
 *
 * On refusal *why says what is wrong, for an errdetail.
 */
bool
StripeMeterUrlIsAllowed(const char *url, const char **why)
{
	const char *host;
	size_t		hostlen;

	if (pg_strncasecmp(url, "https://", 8) == 0)
		host = url + 8;
	else if (pg_strncasecmp(url, "http://", 7) == 0)
		host = url + 7;
	else
	{
		*why = "The URL must start with https:// (or http:// for a loopback address).";
		return false;
	}

	hostlen = strcspn(host, "/?#");
	if (hostlen == 0 || memchr(host, '@', hostlen) != NULL)
	{
		*why = "The URL must name a host, without user information.";
		return false;
	}
	if (host == url + 8)
		return true;

	/* plain http: only to this machine */
	if (strncmp(host, "127.", 4) == 0 ||
		pg_strncasecmp(host, "localhost", 9) == 0 ||
		strncmp(host, "[::1]", 5) == 0)
	{
		const char *after = host;

		if (host[0] == '[')
			after = host + 5;
		else
			while (*after && strchr(":/?#", *after) == NULL)
				after++;

		if (pg_strncasecmp(host, "localhost", 9) == 0 && after != host + 9)
			goto refuse;
		if (strncmp(host, "127.", 4) == 0)
		{
			const char *p;

			for (p = host + 4; p < after; p++)
				if (!((*p >= '0' && *p <= '9') || *p == '.'))
					goto refuse;
		}
		if (*after == '\0' || strchr(":/?#", *after) != NULL)
			return true;
	}
refuse:
	*why = "Plain http is accepted only for a loopback address (127.0.0.0/8, localhost or [::1]); use https.";
	return false;
}

static bool
check_api_url(char **newval, void **extra, GucSource source)
{
	const char *why = NULL;
	size_t		len;

	if (*newval == NULL)
		return true;
	if (!StripeMeterUrlIsAllowed(*newval, &why))
	{
		GUC_check_errdetail("%s", why);
		return false;
	}
	/* keep the base without a trailing slash, so paths join cleanly */
	len = strlen(*newval);
	while (len > 0 && (*newval)[len - 1] == '/')
		(*newval)[--len] = '\0';
	return true;
}

static bool
check_ca_file(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (!is_absolute_path(*newval))
	{
		GUC_check_errdetail("The CA file must be given as an absolute path.");
		return false;
	}
	return true;
}

/*
 * Delivered rows are how a repeated identifier is recognised at enqueue
 * time; Stripe's own uniqueness window is 24 hours, so keep at least that.
 */
static bool
check_delivered_retention(int *newval, void **extra, GucSource source)
{
	if (*newval == -1 || *newval >= 24 * 60)
		return true;
	GUC_check_errdetail("Delivered events must be kept for at least one day (1440 minutes), or -1 to keep them forever.");
	return false;
}

static bool
check_api_key(char **newval, void **extra, GucSource source)
{
	const char *key = *newval ? *newval : "";
	char	   *copy;
	char	   *token;

	/* the token may come back as a value (e.g. RESET): keep the current key */
	if (strcmp(key, API_KEY_TOKEN) == 0)
		key = stripe_meter_api_key ? stripe_meter_api_key : "";

	/* the server frees both with guc_free(), so they come from guc_malloc() */
	copy = guc_malloc(LOG, strlen(key) + 1);
	token = guc_malloc(LOG, sizeof(API_KEY_TOKEN));
	if (copy == NULL || token == NULL)
	{
		if (copy)
			guc_free(copy);
		if (token)
			guc_free(token);
		return false;
	}
	strcpy(copy, key);
	strcpy(token, API_KEY_TOKEN);
	if (*newval)
	{
		explicit_bzero(*newval, strlen(*newval));
		guc_free(*newval);
	}
	*newval = token;
	*extra = copy;
	return true;
}

static void
assign_api_key(const char *newval, void *extra)
{
	stripe_meter_api_key = extra;
}

/*
 * Never show the key: superusers see its kind and last four characters,
 * enough to tell which key is loaded; anyone else sees only whether one is.
 */
static const char *
show_api_key(void)
{
	static char shown[64];
	const char *key = stripe_meter_api_key;
	size_t		len;

	if (key == NULL || key[0] == '\0')
		return "";
	len = strlen(key);
	if (!superuser() || len < 12)
		return "********";
	snprintf(shown, sizeof(shown), "%.8s********%s", key, key + len - 4);
	return shown;
}

/*
 * StripeMeterEffectiveRateLimit
 *		The client-side limit in calls per second; 0 means none.
 *
 * By default it follows the key's mode: Stripe allows 1,000 meter-event
 * calls per second in live mode (10,000 meter event stream requests with
 * API v2), while test mode shares the basic 25/s.
 */
int
StripeMeterEffectiveRateLimit(void)
{
	const char *key = stripe_meter_api_key;

	if (stripe_meter_rate_limit >= 0)
		return stripe_meter_rate_limit;
	if (key != NULL && strstr(key, "_live_") != NULL)
		return stripe_meter_api_version == STRIPE_API_V2 ? 10000 : 1000;
	return 25;
}

/*
 * StripeMeterDefineSettings
 *		Register every stripe_meter.* setting.  Called from _PG_init, also
 *		when the library is loaded without preloading.
 */
void
StripeMeterDefineSettings(void)
{
	DefineCustomBoolVariable("stripe_meter.enabled",
							 "Sets whether meter events are delivered to Stripe.",
							 "When off, events stay queued until it is turned on again.",
							 &stripe_meter_enabled, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("stripe_meter.api_key",
							   "Sets the Stripe secret or restricted API key used for delivery.",
							   "Reload the configuration to rotate it.  It is never shown in full.",
							   &api_key_token, "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							   check_api_key, assign_api_key, show_api_key);

	DefineCustomStringVariable("stripe_meter.api_url",
							   "Sets the base URL of Stripe's API.",
							   "https is required, except for a loopback address.",
							   &stripe_meter_api_url, "https://api.stripe.com",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   check_api_url, NULL, NULL);

	DefineCustomStringVariable("stripe_meter.stripe_version",
							   "Sets the Stripe-Version header sent with every request.",
							   NULL,
							   &stripe_meter_stripe_version, "2026-09-30.endive",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomStringVariable("stripe_meter.ca_file",
							   "Sets a file of CA certificates to verify Stripe's certificate with.",
							   "Empty means the system's CA store.  Verification itself cannot be turned off.",
							   &stripe_meter_ca_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   check_ca_file, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.max_in_flight",
							"Sets how many requests to Stripe may be in flight at once per database.",
							NULL,
							&stripe_meter_max_in_flight, 512, 1, 4096,
							PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomBoolVariable("stripe_meter.http2",
							 "Offers HTTP/2 to an https server, many requests sharing each connection.",
							 "Off: HTTP/1.1, one request at a time per connection.",
							 &stripe_meter_http2, true,
							 PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.max_connections",
							"Sets how many connections to Stripe the worker of a database may open.",
							"0 means automatic: 8 while the server speaks HTTP/2, else one per request in flight, as file descriptors allow.",
							&stripe_meter_max_connections, 0, 0, 4096,
							PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.connect_timeout",
							"Sets how long to wait for a connection to Stripe.",
							NULL,
							&stripe_meter_connect_timeout, 10000, 100, 600000,
							PGC_SIGHUP, GUC_UNIT_MS | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.request_timeout",
							"Sets how long one request to Stripe may take in all.",
							NULL,
							&stripe_meter_request_timeout, 30000, 100, 600000,
							PGC_SIGHUP, GUC_UNIT_MS | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.retry_min_delay",
							"Sets the first delay before a failed attempt is retried.",
							"Each further retry doubles the delay, with jitter, up to stripe_meter.retry_max_delay.",
							&stripe_meter_retry_min_delay, 500, 10, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.retry_max_delay",
							"Sets the longest delay between retries of one event.",
							NULL,
							&stripe_meter_retry_max_delay, 60000, 10, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.rate_limit",
							"Sets the most requests per second sent to Stripe per database.",
							"-1 follows the key: 1000 for a live key, 25 for a test key.  0 means no limit.",
							&stripe_meter_rate_limit, -1, -1, 1000000,
							PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.claim_batch_size",
							"Sets how many queued events the worker claims in one transaction.",
							NULL,
							&stripe_meter_claim_batch_size, 1000, 1, 100000,
							PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.naptime",
							"Sets how often an idle worker looks for due events without being woken.",
							"Commits that queue events wake the worker at once; this is the safety net and the clock for scheduled retries.",
							&stripe_meter_naptime, 5000, 10, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.rollup_settle_delay",
							"Sets how long after a rollup window closes its events are rolled up and sent.",
							"Events committed later than this after their window closed go into a further rollup of the same window.",
							&stripe_meter_rollup_settle_delay, 5000, 0, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.resend_window",
							"Sets how long after its first attempt an event may still be resent.",
							"Stripe keeps idempotency keys for at least 24 hours; past this window a resend could bill twice, so the event fails instead.",
							&stripe_meter_resend_window, 23 * 3600, 1, 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.account_retry_interval",
							"Sets how often a paused Connect account is tried again.",
							"Stripe refused a request for the account with 401, 403 or 404; access may be granted again.",
							&stripe_meter_account_retry_interval, 600, 1, 7 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.delivered_retention",
							"Sets how long delivered events are kept in stripe_meter.meter_events.",
							"At least a day, so that a repeated identifier is still recognised; -1 keeps them forever.",
							&stripe_meter_delivered_retention, 7 * 24 * 60, -1, INT_MAX / 60,
							PGC_SIGHUP, GUC_UNIT_MIN | GUC_SUPERUSER_ONLY,
							check_delivered_retention, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.launcher_naptime",
							"Sets how often the launcher looks for new databases.",
							NULL,
							&stripe_meter_launcher_naptime, 10000, 100, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	/* per database: ALTER DATABASE ... SET, read when the worker connects */
	DefineCustomEnumVariable("stripe_meter.api_version",
							 "Sets which Stripe API delivers this database's meter events.",
							 "v1 sends one event per request; v2 sends batches of up to 100 through a meter event stream session.  The worker reads it when it starts.",
							 &stripe_meter_api_version, STRIPE_API_V1, api_version_options,
							 PGC_SUSET, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomStringVariable("stripe_meter.stream_url",
							   "Sets the base URL of Stripe's meter event stream (API v2).",
							   "https is required, except for a loopback address.",
							   &stripe_meter_stream_url, "https://meter-events.stripe.com",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   check_api_url, NULL, NULL);

	/* sizes shared memory, so it exists only when preloading */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomIntVariable("stripe_meter.max_databases",
								"Sets how many databases can have a delivery worker at once.",
								"Each delivery worker also takes one of max_worker_processes.",
								&stripe_meter_max_databases, 16, 1, 1024,
								PGC_POSTMASTER, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	/* the event lifecycle after delivery: meter checks, syncs, error reports */
	DefineCustomEnumVariable("stripe_meter.unknown_meter",
							 "Sets what enqueueing an event for an unknown or inactive meter does once meters are synced.",
							 "error refuses the event; warning queues it with a warning.",
							 &stripe_meter_unknown_meter, UNKNOWN_METER_ERROR,
							 unknown_meter_options,
							 PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.meter_sync_interval",
							"Sets how often the worker syncs meters from Stripe.",
							"0 turns the scheduled sync off.",
							&stripe_meter_meter_sync_interval, 0, 0, INT_MAX / 1000,
							PGC_SIGHUP, GUC_UNIT_S | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("stripe_meter.error_poll_interval",
							"Sets how often the worker reads Stripe's asynchronous error reports.",
							"0 turns it off.",
							&stripe_meter_error_poll_interval, 300, 0, INT_MAX / 1000,
							PGC_SIGHUP, GUC_UNIT_S | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	MarkGUCPrefixReserved("stripe_meter");
}
