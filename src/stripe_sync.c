/*-------------------------------------------------------------------------
 *
 * stripe_sync.c
 *	  One synchronous Stripe request at a time, for the calls made outside
 *	  the delivery loop's curl multi handle: listing meters and event
 *	  summaries from a backend, and the worker's low-volume calls
 *	  (cancellations, error reports, scheduled meter syncs).
 *
 * The same rules as stripe_client.c: bearer key from the setting (never
 * logged or copied into an error message), the pinned Stripe-Version, TLS
 * verification always on, a capped response and a total timeout.  It
 * never raises an ERROR for network trouble: the caller reads the result.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/stripe_sync.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "miscadmin.h"
#include "storage/ipc.h"

#include "stripe_meter.h"

#define SYNC_MAX_RESPONSE_BYTES (1024 * 1024)

typedef struct SyncResponse
{
	StringInfoData body;
	bool		truncated;
	char		should_retry;
	bool		replayed;
	char		request_id[64];
} SyncResponse;

static bool curl_ready = false;

static size_t
sync_write(char *data, size_t size, size_t nmemb, void *userp)
{
	SyncResponse *r = userp;
	size_t		n = size * nmemb;

	if (r->body.len + n > SYNC_MAX_RESPONSE_BYTES)
	{
		r->truncated = true;
		return 0;
	}
	appendBinaryStringInfoNT(&r->body, data, n);
	return n;
}

static void
copy_header(const char *line, size_t len, size_t nlen, char *out, size_t outlen)
{
	size_t		i;
	size_t		j = 0;

	for (i = nlen + 1; i < len && (line[i] == ' ' || line[i] == '\t'); i++)
		;
	for (; i < len && line[i] != '\r' && line[i] != '\n' && j + 1 < outlen; i++)
		out[j++] = line[i];
	out[j] = '\0';
}

static size_t
sync_header(char *line, size_t size, size_t nmemb, void *userp)
{
	SyncResponse *r = userp;
	size_t		len = size * nmemb;
	char		v[16];

	if (len > 11 && pg_strncasecmp(line, "request-id:", 11) == 0)
		copy_header(line, len, 10, r->request_id, sizeof(r->request_id));
	else if (len > 20 && pg_strncasecmp(line, "stripe-should-retry:", 20) == 0)
	{
		copy_header(line, len, 19, v, sizeof(v));
		r->should_retry = pg_strcasecmp(v, "true") == 0 ? 't' : 'f';
	}
	else if (len > 20 && pg_strncasecmp(line, "idempotent-replayed:", 20) == 0)
	{
		copy_header(line, len, 19, v, sizeof(v));
		r->replayed = pg_strcasecmp(v, "true") == 0;
	}
	return len;
}

/* a cancel or shutdown request ends the transfer instead of waiting for it */
static int
sync_progress(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
			  curl_off_t ultotal, curl_off_t ulnow)
{
	return (ProcDiePending || QueryCancelPending) ? 1 : 0;
}

/*
 * StripeSyncKeyProblem
 *		Why no request can be made with the current key, or NULL.
 */
const char *
StripeSyncKeyProblem(void)
{
	const char *key = stripe_meter_api_key;
	const char *p;

	if (key == NULL || key[0] == '\0')
		return "stripe_meter.api_key is not set";
	if (!(strncmp(key, "sk_", 3) == 0 || strncmp(key, "rk_", 3) == 0))
		return "stripe_meter.api_key is not a Stripe secret or restricted key";
	for (p = key; *p; p++)
		if (*p <= 0x20 || *p >= 0x7f)
			return "stripe_meter.api_key contains spaces or control characters";
	return NULL;
}

/*
 * StripeSyncRequest
 *		Make one request and wait for its answer.
 *
 * method is "GET" or "POST"; path includes the query string; body is the
 * form-encoded POST body (NULL for GET).  idempotency_key and
 * stripe_account may be NULL.  The result's strings are palloc'd in the
 * current memory context.  Returns false only if the request could not be
 * made at all (result->curl_error says why).
 */
bool
StripeSyncRequest(const char *method, const char *path, const char *body,
				  const char *idempotency_key, const char *stripe_account,
				  HttpResult *result)
{
	CURL	   *e;
	struct curl_slist *headers = NULL;
	SyncResponse *r = palloc0(sizeof(SyncResponse));
	char	   *url;
	char		errbuf[CURL_ERROR_SIZE];
	CURLcode	rc;
	long		request_size = 0;
	const char *problem;
	bool		v2 = strncmp(path, "/v2/", 4) == 0;

	memset(result, 0, sizeof(*result));
	problem = StripeSyncKeyProblem();
	if (problem != NULL)
	{
		result->curl_code = -1;
		result->curl_error = problem;
		return false;
	}
	if (!curl_ready)
	{
		if (curl_global_init(CURL_GLOBAL_ALL) != CURLE_OK)
		{
			result->curl_code = -1;
			result->curl_error = "could not initialize libcurl";
			return false;
		}
		curl_ready = true;
	}
	e = curl_easy_init();
	if (e == NULL)
	{
		result->curl_code = -1;
		result->curl_error = "could not create an HTTP request";
		return false;
	}
	initStringInfo(&r->body);
	url = psprintf("%s%s", stripe_meter_api_url, path);

	PG_TRY();
	{
		headers = StripeCurlAddHeader(NULL, "Authorization: Bearer %s", stripe_meter_api_key);
		headers = StripeCurlAddHeader(headers, "Stripe-Version: %s", stripe_meter_stripe_version);
		if (idempotency_key != NULL)
			headers = StripeCurlAddHeader(headers, "Idempotency-Key: %s", idempotency_key);
		if (stripe_account != NULL)
			headers = StripeCurlAddHeader(headers, v2 ? "Stripe-Context: %s" : "Stripe-Account: %s",
									  stripe_account);
		headers = StripeCurlAddHeader(headers, "Accept: %s", "application/json");
		if (body != NULL)
			headers = StripeCurlAddHeader(headers, "Content-Type: %s",
									  "application/x-www-form-urlencoded");
		headers = StripeCurlAddHeader(headers, "Expect:%s", "");
	}
	PG_CATCH();
	{
		curl_slist_free_all(headers);
		curl_easy_cleanup(e);
		PG_RE_THROW();
	}
	PG_END_TRY();

	errbuf[0] = '\0';
	StripeCurlSetTransport(e, url);
	if (body != NULL)
	{
		curl_easy_setopt(e, CURLOPT_POST, 1L);
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long) strlen(body));
	}
	else
		curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(e, CURLOPT_USERAGENT, "stripe_meter/" STRIPE_METER_VERSION);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, sync_write);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, sync_header);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, sync_progress);

	rc = curl_easy_perform(e);

	result->curl_code = rc;
	curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &result->status);
	curl_easy_getinfo(e, CURLINFO_REQUEST_SIZE, &request_size);
	result->connected = request_size > 0;
	if (r->truncated)
		result->curl_error = "the response was larger than 1 MB";
	else if (rc != CURLE_OK)
		result->curl_error = pstrdup(errbuf[0] ? errbuf : curl_easy_strerror(rc));
	result->body = r->body.data;
	result->body_len = r->body.len;
	result->body_truncated = r->truncated;
	result->request_id = r->request_id[0] ? pstrdup(r->request_id) : NULL;
	result->should_retry = r->should_retry;
	result->replayed = r->replayed;
	result->with_account = (stripe_account != NULL);

	curl_slist_free_all(headers);	/* holds the key: free at once */
	curl_easy_cleanup(e);
	pfree(url);
	/* a backend whose query was cancelled stops here */
	if (!AmBackgroundWorkerProcess())
		CHECK_FOR_INTERRUPTS();
	return true;
}

/*
 * StripeSyncErrorText
 *		A one-line description of a failed answer, for people: Stripe's
 *		error message when there is one.  Never contains the key.
 */
char *
StripeSyncErrorText(const HttpResult *http)
{
	StripeResponse resp;

	StripeReadAnswer(http, &resp);
	return StripeAnswerText(http, &resp);
}

/*
 * StripeSyncGetJson
 *		GET path and return the JSON body as text, or raise an ERROR that
 *		says what Stripe answered.  For backends (SQL functions).
 */
char *
StripeSyncGetJson(const char *path, const char *stripe_account)
{
	HttpResult	http;
	StripeResponse resp;

	if (!StripeSyncRequest("GET", path, NULL, NULL, stripe_account, &http))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot call Stripe: %s", http.curl_error)));
	if (http.curl_code != 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("%s", StripeSyncErrorText(&http)),
				 errhint("Check stripe_meter.api_url and the network.")));
	StripeReadAnswer(&http, &resp);
	if (http.status != 200 || !resp.valid)
		ereport(ERROR,
				(errcode(http.status == 404 ? ERRCODE_UNDEFINED_OBJECT :
						 ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("Stripe refused GET %s", path),
				 errdetail("%s.", StripeAnswerText(&http, &resp))));
	return pnstrdup(http.body, http.body_len);
}
