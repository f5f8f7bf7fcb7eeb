/*-------------------------------------------------------------------------
 *
 * stripe_client.c
 *	  The one HTTP client, and the only file that uses libcurl.  In the
 *	  worker, every Stripe call (deliveries, cancellations, meter syncs,
 *	  error reports) is a request on one multi handle, with connections
 *	  reused and one wait that covers curl's sockets and the worker's latch
 *	  together (PostgreSQL's WaitEventSet), so none of them holds up the
 *	  others.  A backend's SQL functions that read from Stripe use the
 *	  blocking StripeClientPerform(), which sets requests up the same way.
 *
 * Each request carries bearer authentication (the API key, or a v2 meter
 * event session's token), the pinned Stripe-Version, the event's
 * Idempotency-Key when there is one, a User-Agent naming stripe_meter,
 * and Stripe-Account when the event has one.  TLS verification is always on;
 * plain http is accepted only for loopback URLs (checked when the setting
 * is loaded).  Response bodies are capped, so a hostile or broken server
 * cannot make the worker's memory grow, and every request has a total
 * timeout, so a server that never answers, or trickles, cannot hold a
 * request forever.
 *
 * Nothing here raises an ERROR for network trouble: every request ends in
 * exactly one call of the done callback with what happened.  The curl
 * callbacks never ereport either, since a longjmp through libcurl would
 * leave it inconsistent.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/stripe_client.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/socket.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/epoll.h>
#define USE_CURL_EPOLL
#endif

#include <curl/curl.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/*
 * Stripe's answers to a POST are a few hundred bytes, a page of a list a few
 * hundred kB at most; anything past these is refused.
 */
#define MAX_RESPONSE_BYTES	(256 * 1024)
#define MAX_LIST_BYTES		(1024 * 1024)
#define MAX_WAIT_EVENTS		64
#define MAX_SOCKET_EVENTS	256

/*
 * A request's own header lines, which it links in front of the shared ones
 * (see shared_headers): room for Stripe's longest values (an
 * Idempotency-Key, a Stripe-Account or Stripe-Context, a session token).
 */
#define HEADER_LINE_BYTES	512

typedef enum RequestHeader
{
	HDR_AUTHORIZATION,			/* a session token's; else the shared key line */
	HDR_IDEMPOTENCY_KEY,
	HDR_ACCOUNT,
	HDR_CONTENT_TYPE,
	NUM_REQUEST_HEADERS
} RequestHeader;

typedef struct StripeRequest
{
	CURL	   *easy;
	struct curl_slist header_nodes[NUM_REQUEST_HEADERS];
	char		header_lines[NUM_REQUEST_HEADERS][HEADER_LINE_BYTES];
	void	   *owner;
	StringInfoData response;
	bool		truncated;
	char		should_retry;
	bool		replayed;
	bool		with_account;	/* Stripe-Account was sent */
	bool		lifecycle;		/* not a delivery (StripeClientInFlight) */
	size_t		max_response;
	char		request_id[64];
	char		errbuf[CURL_ERROR_SIZE];
	StripeDoneCallback done;	/* called once, with the answer */
	struct StripeRequest *next_free;
	dlist_node	in_flight_node; /* in requests_in_flight while on multi */
} StripeRequest;

typedef struct SocketEntry
{
	curl_socket_t fd;			/* hash key */
	uint32		events;			/* WL_SOCKET_* curl wants */
	int			pos;			/* position in the wait set, -1 if none */
} SocketEntry;

static MemoryContext client_cxt = NULL;
static CURLM *multi = NULL;
static CURLSH *share = NULL;	/* TLS sessions and DNS answers, for every
								 * handle of the process */
static HTAB *sockets = NULL;
static WaitEventSet *wait_set = NULL;
static bool wait_set_dirty = true;

/*
 * On Linux curl's sockets live in an epoll set of their own, changed one
 * socket at a time as curl asks, and the wait set holds only the latch,
 * postmaster death and that epoll descriptor, so it is never rebuilt.
 * Elsewhere the wait set holds the sockets and is rebuilt when one goes
 * away, which costs a system call per socket in flight each time a
 * connection finishes a transfer (measured: about a sixth of the worker's
 * CPU at 256 requests in flight).
 */
#ifdef USE_CURL_EPOLL
static int	curl_epoll_fd = -1;
#endif
static TimestampTz curl_deadline = 0;	/* 0: no timer */
static int	in_flight = 0;			/* deliveries */
static int	lifecycle_in_flight = 0;	/* other calls */
static StripeRequest *free_requests = NULL;
static dlist_head requests_in_flight = DLIST_STATIC_INIT(requests_in_flight);
static char *user_agent = NULL;

/*
 * The header lines every request carries, built once and again when the key
 * or the pinned version changes: Authorization with the API key,
 * Stripe-Version, Accept, and an empty Expect (no 100-continue round trip).
 * libcurl only reads a header list, so requests link their own lines in
 * front of these and nothing is allocated per request.
 */
#define NUM_SHARED_HEADERS	4
static struct curl_slist shared_nodes[NUM_SHARED_HEADERS];
static char shared_key_line[HEADER_LINE_BYTES];
static char shared_version_line[128];
static char *shared_for_key = NULL; /* what they were built from */
static char *shared_for_version = NULL;

/* The https URL whose server answered in HTTP/1.x: nothing to multiplex. */
static char *url_without_h2 = NULL;

#define H2_CONNECTIONS		8	/* connections when requests multiplex */

/* wipe the shared lines: the Authorization line holds the key */
static void
forget_shared_headers(void)
{
	explicit_bzero(shared_key_line, sizeof(shared_key_line));
	if (shared_for_key != NULL)
	{
		explicit_bzero(shared_for_key, strlen(shared_for_key));
		pfree(shared_for_key);
	}
	if (shared_for_version != NULL)
		pfree(shared_for_version);
	shared_for_key = NULL;
	shared_for_version = NULL;
}

static void
client_exit(int code, Datum arg)
{
	forget_shared_headers();
	if (multi != NULL)
		curl_multi_cleanup(multi);
	multi = NULL;
	if (share != NULL)
		curl_share_cleanup(share);
	share = NULL;
	curl_global_cleanup();
}

/*
 * curl's sockets count against the process's file descriptors like any
 * other, so they are reserved through fd.c: PostgreSQL then keeps its own
 * cache of open files smaller instead of running out.
 */
static curl_socket_t
open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *address)
{
	curl_socket_t s;

	if (!AcquireExternalFD())
	{
		errno = EMFILE;
		return CURL_SOCKET_BAD;
	}
	s = socket(address->family, address->socktype, address->protocol);
	if (s == CURL_SOCKET_BAD)
		ReleaseExternalFD();
	else if (sockets != NULL)
		hash_search(sockets, &s, HASH_REMOVE, NULL);	/* a reused number */
	return s;
}

static int
close_socket(void *clientp, curl_socket_t s)
{
	int			rc;

	if (sockets != NULL)
		hash_search(sockets, &s, HASH_REMOVE, NULL);
#ifdef USE_CURL_EPOLL
	if (curl_epoll_fd >= 0)
		(void) epoll_ctl(curl_epoll_fd, EPOLL_CTL_DEL, s, NULL);
#endif
	rc = close(s);
	ReleaseExternalFD();
	return rc;
}

static int
socket_callback(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	SocketEntry *entry;
	bool		found;
	uint32		events = 0;

	if (what == CURL_POLL_REMOVE)
	{
		hash_search(sockets, &s, HASH_REMOVE, NULL);
#ifdef USE_CURL_EPOLL
		(void) epoll_ctl(curl_epoll_fd, EPOLL_CTL_DEL, s, NULL);
#else
		wait_set_dirty = true;
#endif
		return 0;
	}
	if (what & CURL_POLL_IN)
		events |= WL_SOCKET_READABLE;
	if (what & CURL_POLL_OUT)
		events |= WL_SOCKET_WRITEABLE;

	entry = hash_search(sockets, &s, HASH_ENTER, &found);
	if (!found)
		entry->pos = -1;
	if (found && entry->events == events)
		return 0;
	entry->events = events;
#ifdef USE_CURL_EPOLL
	{
		struct epoll_event ev;

		memset(&ev, 0, sizeof(ev));
		ev.events = ((what & CURL_POLL_IN) ? EPOLLIN : 0) |
			((what & CURL_POLL_OUT) ? EPOLLOUT : 0);
		ev.data.fd = s;
		if (epoll_ctl(curl_epoll_fd, entry->pos >= 0 ? EPOLL_CTL_MOD : EPOLL_CTL_ADD,
					  s, &ev) != 0 &&
			epoll_ctl(curl_epoll_fd, entry->pos >= 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD,
					  s, &ev) != 0)
		{
			hash_search(sockets, &s, HASH_REMOVE, NULL);
			return -1;			/* curl fails this transfer */
		}
		entry->pos = 0;			/* registered */
	}
	return 0;
#endif
	if (!wait_set_dirty && entry->pos >= 0 && events != 0)
		ModifyWaitEvent(wait_set, entry->pos, events, NULL);
	else
		wait_set_dirty = true;
	return 0;
}

static int
timer_callback(CURLM *m, long timeout_ms, void *userp)
{
	if (timeout_ms < 0)
		curl_deadline = 0;
	else
		curl_deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);
	return 0;
}

static size_t
write_callback(char *data, size_t size, size_t nmemb, void *userp)
{
	StripeRequest *req = userp;
	size_t		n = size * nmemb;

	if (req->response.len + n > req->max_response)
	{
		req->truncated = true;
		return 0;				/* aborts the transfer */
	}
	appendBinaryStringInfoNT(&req->response, data, n);
	return n;
}

/* copy a header's value, trimmed, if the line is that header */
static bool
header_value(const char *line, size_t len, const char *name, char *out, size_t outlen)
{
	size_t		nlen = strlen(name);
	size_t		i;
	size_t		j = 0;

	if (len <= nlen || pg_strncasecmp(line, name, nlen) != 0 || line[nlen] != ':')
		return false;
	for (i = nlen + 1; i < len && (line[i] == ' ' || line[i] == '\t'); i++)
		;
	for (; i < len && line[i] != '\r' && line[i] != '\n' && j + 1 < outlen; i++)
		out[j++] = line[i];
	out[j] = '\0';
	return true;
}

static size_t
header_callback(char *line, size_t size, size_t nmemb, void *userp)
{
	StripeRequest *req = userp;
	size_t		len = size * nmemb;
	char		value[16];

	if (header_value(line, len, "request-id", req->request_id, sizeof(req->request_id)))
		return len;
	if (header_value(line, len, "stripe-should-retry", value, sizeof(value)))
		req->should_retry = pg_strcasecmp(value, "true") == 0 ? 't' : 'f';
	else if (header_value(line, len, "idempotent-replayed", value, sizeof(value)))
		req->replayed = pg_strcasecmp(value, "true") == 0;
	return len;
}

/* curl, this file's memory and the User-Agent: once per process */
static void
client_setup(void)
{
	curl_version_info_data *v;

	if (client_cxt != NULL)
		return;
	if (curl_global_init(CURL_GLOBAL_ALL) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not initialize libcurl")));
	client_cxt = AllocSetContextCreate(TopMemoryContext,
									   "stripe_meter HTTP client",
									   ALLOCSET_DEFAULT_SIZES);

	/*
	 * One process, one thread: the share needs no locks.  A request made on
	 * a new connection resumes the TLS session of an earlier one.
	 */
	share = curl_share_init();
	if (share != NULL)
	{
		curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
		curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
	}
	v = curl_version_info(CURLVERSION_NOW);
	user_agent = MemoryContextStrdup(client_cxt,
									 psprintf("stripe_meter/%s (PostgreSQL %s) libcurl/%s",
											  STRIPE_METER_VERSION, PG_VERSION,
											  v ? v->version : "unknown"));
}

/*
 * StripeClientInit
 *		Set up the multi handle and its wait.  Call once, in the worker.
 */
void
StripeClientInit(void)
{
	HASHCTL		ctl;

	client_setup();
	on_proc_exit(client_exit, (Datum) 0);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(curl_socket_t);
	ctl.entrysize = sizeof(SocketEntry);
	ctl.hcxt = client_cxt;
	sockets = hash_create("stripe_meter curl sockets", 256, &ctl,
						  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

#ifdef USE_CURL_EPOLL
	ReserveExternalFD();
	curl_epoll_fd = epoll_create1(EPOLL_CLOEXEC);
	if (curl_epoll_fd < 0)
		ereport(ERROR,
				(errcode_for_socket_access(),
				 errmsg("could not create an epoll descriptor for the HTTP client: %m")));
#endif

	multi = curl_multi_init();
	if (multi == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create the HTTP client")));
	curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, socket_callback);
	curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, timer_callback);
	/*
	 * Many requests share an HTTP/2 connection, up to the server's limit.
	 * Until the server's settings arrive a connection is assumed to take
	 * 100 streams (the least HTTP/2 servers are advised to allow), not
	 * more: streams past the server's limit are refused, and curl then
	 * gives that connection up once its streams are done.
	 */
	curl_multi_setopt(multi, CURLMOPT_PIPELINING, (long) CURLPIPE_MULTIPLEX);
#if LIBCURL_VERSION_NUM >= 0x074300
	curl_multi_setopt(multi, CURLMOPT_MAX_CONCURRENT_STREAMS, 100L);
#endif
}

/*
 * StripeKeyProblem
 *		Why no request can be made with the current key, or NULL.
 */
const char *
StripeKeyProblem(void)
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
 * StripeClientAppendEscaped
 *		Percent-encode everything but RFC 3986's unreserved characters, as
 *		curl_easy_escape() does, which is valid form encoding.
 */
void
StripeClientAppendEscaped(StringInfo buf, const char *s, int len)
{
	static const char hex[] = "0123456789ABCDEF";
	int			i;

	/* not curl_easy_escape(): its allocation per call was 5 % of the worker */
	enlargeStringInfo(buf, len * 3);
	for (i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			(c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' || c == '~')
			buf->data[buf->len++] = (char) c;
		else
		{
			buf->data[buf->len++] = '%';
			buf->data[buf->len++] = hex[c >> 4];
			buf->data[buf->len++] = hex[c & 0x0F];
		}
	}
	buf->data[buf->len] = '\0';
}

static StripeRequest *
take_request(void)
{
	StripeRequest *req = free_requests;

	if (req != NULL)
	{
		free_requests = req->next_free;
		curl_easy_reset(req->easy);
		resetStringInfo(&req->response);
	}
	else
	{
		MemoryContext old = MemoryContextSwitchTo(client_cxt);

		req = palloc0(sizeof(StripeRequest));
		initStringInfo(&req->response);
		req->easy = curl_easy_init();
		MemoryContextSwitchTo(old);
		if (req->easy == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("could not create an HTTP request")));
	}
	req->owner = NULL;
	req->done = NULL;
	req->lifecycle = false;
	req->truncated = false;
	req->should_retry = 0;
	req->replayed = false;
	req->request_id[0] = '\0';
	req->errbuf[0] = '\0';
	req->next_free = NULL;
	return req;
}

static void
give_back_request(StripeRequest *req)
{
	/* a session token may be in it */
	explicit_bzero(req->header_lines[HDR_AUTHORIZATION], HEADER_LINE_BYTES);
	/* keep memory flat: do not keep an unusually large buffer around */
	if (req->response.maxlen > 64 * 1024)
	{
		pfree(req->response.data);
		req->response.data = MemoryContextAlloc(client_cxt, 1024);
		req->response.maxlen = 1024;
	}
	resetStringInfo(&req->response);
	req->next_free = free_requests;
	free_requests = req;
}

/*
 * header_line
 *		Format one header line (fmt with one %s) into buf, refusing a value
 *		that does not fit rather than sending it cut short.
 */
static char *
header_line(char *buf, size_t size, const char *fmt, const char *value)
{
	if (snprintf(buf, size, fmt, value) >= (int) size)
	{
		explicit_bzero(buf, size);
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("an HTTP header for Stripe is longer than %d bytes", (int) size - 1)));
	}
	return buf;
}

/* the shared header lines, rebuilt when the key or the version changed */
static struct curl_slist *
shared_headers(void)
{
	const char *key = stripe_meter_api_key ? stripe_meter_api_key : "";
	const char *version = stripe_meter_stripe_version ? stripe_meter_stripe_version : "";
	int			i;

	if (shared_for_key != NULL && strcmp(shared_for_key, key) == 0 &&
		strcmp(shared_for_version, version) == 0)
		return &shared_nodes[0];

	forget_shared_headers();
	header_line(shared_key_line, sizeof(shared_key_line), "Authorization: Bearer %s", key);
	header_line(shared_version_line, sizeof(shared_version_line), "Stripe-Version: %s", version);
	shared_nodes[0].data = shared_key_line;
	shared_nodes[1].data = shared_version_line;
	shared_nodes[2].data = "Accept: application/json";
	shared_nodes[3].data = "Expect:";
	for (i = 0; i < NUM_SHARED_HEADERS; i++)
		shared_nodes[i].next = (i + 1 < NUM_SHARED_HEADERS) ? &shared_nodes[i + 1] : NULL;
	shared_for_key = MemoryContextStrdup(TopMemoryContext, key);
	shared_for_version = MemoryContextStrdup(TopMemoryContext, version);
	return &shared_nodes[0];
}

/* link one of req's own lines in front of list */
static struct curl_slist *
push_header(StripeRequest *req, RequestHeader which, struct curl_slist *list,
			const char *fmt, const char *value)
{
	struct curl_slist *node = &req->header_nodes[which];

	node->data = header_line(req->header_lines[which], HEADER_LINE_BYTES, fmt, value);
	node->next = list;
	return node;
}

/*
 * request_headers
 *		The header list for a request: its own lines, then the shared ones
 *		(whose Authorization line a session token's replaces).
 */
static struct curl_slist *
request_headers(StripeRequest *req, const StripeRequestSpec *spec)
{
	struct curl_slist *list = shared_headers();

	if (spec->bearer != NULL)
	{
		/* the token's line takes the key line's place */
		list = push_header(req, HDR_AUTHORIZATION, list->next,
						   "Authorization: Bearer %s", spec->bearer);
	}
	if (spec->idempotency_key != NULL)
		list = push_header(req, HDR_IDEMPOTENCY_KEY, list,
						   "Idempotency-Key: %s", spec->idempotency_key);
	if (spec->stripe_account != NULL)
		list = push_header(req, HDR_ACCOUNT, list,
						   spec->stripe_context ? "Stripe-Context: %s" : "Stripe-Account: %s",
						   spec->stripe_account);
	if (spec->body != NULL)
		list = push_header(req, HDR_CONTENT_TYPE, list, "Content-Type: %s",
						   spec->content_type ? spec->content_type :
						   "application/x-www-form-urlencoded");
	return list;
}

/*
 * set_transport
 *		The URL and every transport setting a request to Stripe needs: only
 *		https and (loopback-only, checked by the settings) http, no
 *		redirects, certificate and host verification always on, the
 *		configured CA file, the timeouts.
 */
static void
set_transport(CURL *e, const char *url)
{
	curl_easy_setopt(e, CURLOPT_URL, url);
#if LIBCURL_VERSION_NUM >= 0x075500
	curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https,http");
	curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "https");
#else
	curl_easy_setopt(e, CURLOPT_PROTOCOLS, CURLPROTO_HTTPS | CURLPROTO_HTTP);
#endif

	/*
	 * Plain http is allowed only to loopback, but libcurl would still send
	 * it (key included) through a proxy named by http_proxy in the server's
	 * environment: never use a proxy for it.  https may use one (CONNECT
	 * keeps the key encrypted and the certificate verified).
	 */
	if (pg_strncasecmp(url, "http://", 7) == 0)
		curl_easy_setopt(e, CURLOPT_PROXY, "");
	curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
	if (stripe_meter_ca_file != NULL && stripe_meter_ca_file[0] != '\0')
		curl_easy_setopt(e, CURLOPT_CAINFO, stripe_meter_ca_file);
	/* the CA file is read once per process, not for every connection */
#if LIBCURL_VERSION_NUM >= 0x075700
	curl_easy_setopt(e, CURLOPT_CA_CACHE_TIMEOUT, 86400L);
#endif
	if (share != NULL)
		curl_easy_setopt(e, CURLOPT_SHARE, share);

	/*
	 * HTTP/2 when the server offers it (ALPN); a new request waits for a
	 * connection it can share rather than opening one of its own.
	 */
	if (stripe_meter_http2 && pg_strncasecmp(url, "https://", 8) == 0)
	{
		curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_2TLS);
		curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
	}
	else
		curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_1_1);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long) stripe_meter_connect_timeout);
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long) stripe_meter_request_timeout);
}

/*
 * prepare_request
 *		Set req's easy handle up as spec says: headers, transport, method,
 *		body and the callbacks that collect the answer.
 */
static void
prepare_request(StripeRequest *req, const StripeRequestSpec *spec)
{
	CURL	   *e = req->easy;
	char	   *url = psprintf("%s%s", spec->base_url, spec->path);
	bool		get = spec->body == NULL;
	struct curl_slist *headers;

	req->owner = spec->owner;
	req->done = spec->done;
	req->lifecycle = spec->lifecycle;
	req->with_account = (spec->stripe_account != NULL);
	req->max_response = get ? MAX_LIST_BYTES : MAX_RESPONSE_BYTES;
	headers = request_headers(req, spec);

	set_transport(e, url);
	if (get)
		curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
	else
	{
		curl_easy_setopt(e, CURLOPT_POST, 1L);
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, spec->body);
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long) strlen(spec->body));
	}
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(e, CURLOPT_USERAGENT, user_agent);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_callback);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, req);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_callback);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, req);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, req->errbuf);
	curl_easy_setopt(e, CURLOPT_PRIVATE, req);
	curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket);
	curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, close_socket);
	curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
	pfree(url);
}

/* a request taken and set up; given back if setting it up fails */
static StripeRequest *
prepared_request(const StripeRequestSpec *spec)
{
	StripeRequest *volatile req = take_request();

	PG_TRY();
	{
		prepare_request(req, spec);
	}
	PG_CATCH();
	{
		give_back_request(req);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return req;
}

/* what happened to a finished transfer; the strings point into req */
static void
read_result(StripeRequest *req, CURLcode code, HttpResult *http)
{
	long		request_size = 0;

	memset(http, 0, sizeof(*http));
	http->transport_code = code;
	curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &http->status);
	curl_easy_getinfo(req->easy, CURLINFO_REQUEST_SIZE, &request_size);
	http->connected = request_size > 0;
	if (req->truncated)
		http->transport_error = req->max_response == MAX_LIST_BYTES ?
			"the response was larger than 1 MB" :
			"the response was larger than 256 kB";
	else if (code != CURLE_OK)
		http->transport_error = req->errbuf[0] ? req->errbuf : curl_easy_strerror(code);
	http->body = req->response.data;
	http->body_len = req->response.len;
	http->body_truncated = req->truncated;
	http->request_id = req->request_id[0] ? req->request_id : NULL;
	http->should_retry = req->should_retry;
	http->replayed = req->replayed;
	http->with_account = req->with_account;
}

/*
 * StripeHttpResultCopy
 *		A copy of an answer, strings included, in the current memory
 *		context: for keeping an answer past its done callback.
 */
HttpResult *
StripeHttpResultCopy(const HttpResult *http)
{
	HttpResult *copy = palloc(sizeof(HttpResult));

	*copy = *http;
	copy->body = http->body ? pnstrdup(http->body, http->body_len) : NULL;
	copy->request_id = http->request_id ? pstrdup(http->request_id) : NULL;
	copy->transport_error = http->transport_error ? pstrdup(http->transport_error) : NULL;
	return copy;
}

/*
 * StripeClientStartRequest
 *		Put one request in flight on the worker's multi handle, as spec
 *		says.  spec->body must stay valid until the request's done callback
 *		has run; returns false if curl refused it (no callback then).
 *		spec->done is called with its answer from StripeClientWait.
 */
bool
StripeClientStartRequest(const StripeRequestSpec *spec)
{
	StripeRequest *req = prepared_request(spec);

	if (curl_multi_add_handle(multi, req->easy) != CURLM_OK)
	{
		give_back_request(req);
		return false;
	}
	if (req->lifecycle)
		lifecycle_in_flight++;
	else
		in_flight++;
	dlist_push_tail(&requests_in_flight, &req->in_flight_node);
	return true;
}

/* a cancel or shutdown request ends a blocking transfer instead of waiting */
static int
interrupt_progress(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
				   curl_off_t ultotal, curl_off_t ulnow)
{
	return (ProcDiePending || QueryCancelPending) ? 1 : 0;
}

/*
 * StripeClientPerform
 *		Make one request, set up as the worker's are, and wait for its
 *		answer: for a backend's SQL functions, never for the worker.
 *
 * The result's strings are palloc'd in the current memory context.  Returns
 * false only if the request could not be made at all (result->transport_error
 * says why).  A cancelled query stops here once the transfer has ended.
 */
bool
StripeClientPerform(const StripeRequestSpec *spec, HttpResult *result)
{
	const char *problem = spec->bearer ? NULL : StripeKeyProblem();
	StripeRequest *req;
	HttpResult	http;
	CURLcode	code;

	memset(result, 0, sizeof(*result));
	if (problem != NULL)
	{
		result->transport_code = -1;
		result->transport_error = problem;
		return false;
	}
	client_setup();
	req = prepared_request(spec);
	curl_easy_setopt(req->easy, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(req->easy, CURLOPT_XFERINFOFUNCTION, interrupt_progress);

	code = curl_easy_perform(req->easy);

	read_result(req, code, &http);
	*result = *StripeHttpResultCopy(&http);
	give_back_request(req);
	if (!AmBackgroundWorkerProcess())
		CHECK_FOR_INTERRUPTS();
	return true;
}

/*
 * StripeClientGetJson
 *		GET path and return the JSON body as text, or raise an ERROR that
 *		says what Stripe answered.  For a backend's SQL functions.
 */
char *
StripeClientGetJson(const char *path, const char *stripe_account)
{
	StripeRequestSpec spec = {
		.base_url = stripe_meter_api_url,
		.path = path,
		.stripe_account = stripe_account,
	};
	HttpResult	http;
	StripeResponse resp;

	if (!StripeClientPerform(&spec, &http))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot call Stripe: %s", http.transport_error)));
	if (http.transport_code != 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("%s", StripeFailureText(&http)),
				 errhint("Check stripe_meter.api_url and the network.")));
	StripeReadAnswer(&http, &resp);
	if (http.status != 200 || !resp.valid)
		ereport(ERROR,
				(errcode(http.status == 404 ? ERRCODE_UNDEFINED_OBJECT :
						 ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("Stripe refused GET %s", path),
				 errdetail("%s.", StripeAnswerText(&http, &resp))));
	return (char *) http.body;
}

/*
 * StripeClientInFlight
 *		Deliveries in flight; the other calls are not counted.
 */
int
StripeClientInFlight(void)
{
	return in_flight;
}

static void
rebuild_wait_set(void)
{
	HASH_SEQ_STATUS seq;
	SocketEntry *entry;
	long		nsockets = hash_get_num_entries(sockets);

	if (wait_set != NULL)
		FreeWaitEventSet(wait_set);
	wait_set = create_wait_event_set(client_cxt, (int) nsockets + 3);
	AddWaitEventToSet(wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
#ifdef USE_CURL_EPOLL
	AddWaitEventToSet(wait_set, WL_SOCKET_READABLE, curl_epoll_fd, NULL, NULL);
	wait_set_dirty = false;
	return;
#endif

	hash_seq_init(&seq, sockets);
	while ((entry = hash_seq_search(&seq)) != NULL)
	{
		if (entry->events == 0)
			entry->pos = -1;
		else
			entry->pos = AddWaitEventToSet(wait_set, entry->events, entry->fd,
										   NULL, NULL);
	}
	wait_set_dirty = false;
}

/* multiplexing connections: https, HTTP/2 offered, and not refused */
static bool
multiplexing(void)
{
	return stripe_meter_http2 &&
		pg_strncasecmp(stripe_meter_api_url, "https://", 8) == 0 &&
		(url_without_h2 == NULL || strcmp(url_without_h2, stripe_meter_api_url) != 0);
}

/*
 * An answer over https in HTTP/1.x: the server does not speak HTTP/2, so
 * each connection carries one request at a time and more are needed.
 */
static void
note_http_version(StripeRequest *req)
{
	long		version = 0;
	char	   *url = NULL;

	if (!multiplexing())
		return;
	curl_easy_getinfo(req->easy, CURLINFO_EFFECTIVE_URL, &url);
	curl_easy_getinfo(req->easy, CURLINFO_HTTP_VERSION, &version);
	if (url == NULL || pg_strncasecmp(url, "https://", 8) != 0 ||
		version == 0 || version >= CURL_HTTP_VERSION_2_0)
		return;
	if (url_without_h2 != NULL)
		pfree(url_without_h2);
	url_without_h2 = MemoryContextStrdup(client_cxt, stripe_meter_api_url);
	ereport(LOG,
			(errmsg("stripe_meter worker: %s does not offer HTTP/2, so each connection carries one request at a time",
					stripe_meter_api_url)));
	StripeClientSettingsChanged();
}

/* hand every finished transfer to the done callback */
static void
drain_finished(void)
{
	CURLMsg    *msg;
	int			left;

	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
	{
		StripeRequest *req;
		HttpResult	http;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &req);
		read_result(req, msg->data.result, &http);
		if (http.status != 0)
			note_http_version(req);
		curl_multi_remove_handle(multi, req->easy);
		dlist_delete(&req->in_flight_node);
		if (req->lifecycle)
			lifecycle_in_flight--;
		else
			in_flight--;
		req->done(req->owner, &http);
		give_back_request(req);
	}
}

/*
 * StripeClientDropUnsent
 *		End every delivery request that has sent nothing yet (waiting for a
 *		connection, or in its TLS handshake), each through its done
 *		callback with an answer that says why and that nothing reached
 *		Stripe.  While Stripe does not answer, each of them would otherwise
 *		try a connection of its own.  Returns how many.
 */
int
StripeClientDropUnsent(const char *why)
{
	dlist_mutable_iter iter;
	dlist_head	dropped;
	int			n = 0;

	/* take them all off the multi handle first: a callback may add more */
	dlist_init(&dropped);
	dlist_foreach_modify(iter, &requests_in_flight)
	{
		StripeRequest *req = dlist_container(StripeRequest, in_flight_node, iter.cur);
		long		request_size = 0;

		if (req->lifecycle)
			continue;
		curl_easy_getinfo(req->easy, CURLINFO_REQUEST_SIZE, &request_size);
		if (request_size > 0)
			continue;
		curl_multi_remove_handle(multi, req->easy);
		dlist_delete(&req->in_flight_node);
		dlist_push_tail(&dropped, &req->in_flight_node);
		in_flight--;
	}
	while (!dlist_is_empty(&dropped))
	{
		StripeRequest *req = dlist_container(StripeRequest, in_flight_node,
											 dlist_pop_head_node(&dropped));
		HttpResult	http;

		memset(&http, 0, sizeof(http));
		http.transport_code = CURLE_ABORTED_BY_CALLBACK;
		http.transport_error = why;
		req->done(req->owner, &http);
		give_back_request(req);
		n++;
	}
	return n;
}

#ifdef USE_CURL_EPOLL
/* let curl act on every socket that is ready, without waiting */
static void
drive_ready_sockets(void)
{
	struct epoll_event ready[MAX_SOCKET_EVENTS];
	int			n;
	int			i;
	int			running;

	n = epoll_wait(curl_epoll_fd, ready, MAX_SOCKET_EVENTS, 0);
	for (i = 0; i < n; i++)
	{
		int			flags = 0;

		if (ready[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
			flags |= CURL_CSELECT_IN;
		if (ready[i].events & EPOLLOUT)
			flags |= CURL_CSELECT_OUT;
		if (ready[i].events & EPOLLERR)
			flags |= CURL_CSELECT_ERR;
		curl_multi_socket_action(multi, ready[i].data.fd, flags, &running);
	}
}
#endif

/*
 * StripeClientWait
 *		Wait up to timeout_ms (-1: no limit) for the latch or curl's sockets,
 *		drive curl, and hand each finished request to its done callback.
 *
 * Returns true if the latch was set (and resets it); the caller then runs
 * CHECK_FOR_INTERRUPTS and looks for new work.  Exits the process if the
 * postmaster dies.
 */
bool
StripeClientWait(long timeout_ms, uint32 wait_event_info)
{
	WaitEvent	events[MAX_WAIT_EVENTS];
	int			n;
	int			i;
	int			running;
	bool		latch_set = false;

	if (wait_set == NULL || wait_set_dirty)
		rebuild_wait_set();

	if (curl_deadline != 0)
	{
		long		secs;
		int			usecs;
		long		curl_ms;

		TimestampDifference(GetCurrentTimestamp(), curl_deadline, &secs, &usecs);
		curl_ms = secs * 1000 + (usecs + 999) / 1000;
		if (timeout_ms < 0 || curl_ms < timeout_ms)
			timeout_ms = curl_ms;
	}

	n = WaitEventSetWait(wait_set, timeout_ms, events, MAX_WAIT_EVENTS,
						 wait_event_info);
	for (i = 0; i < n; i++)
	{
		if (events[i].events & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			latch_set = true;
		}
#ifdef USE_CURL_EPOLL
		else if (events[i].fd == curl_epoll_fd)
			drive_ready_sockets();
#endif
		else if (events[i].events & (WL_SOCKET_READABLE | WL_SOCKET_WRITEABLE))
		{
			int			flags = 0;

			if (events[i].events & WL_SOCKET_READABLE)
				flags |= CURL_CSELECT_IN;
			if (events[i].events & WL_SOCKET_WRITEABLE)
				flags |= CURL_CSELECT_OUT;
			curl_multi_socket_action(multi, events[i].fd, flags, &running);
		}
	}

	if (curl_deadline != 0 && GetCurrentTimestamp() >= curl_deadline)
	{
		curl_deadline = 0;
		curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
	}

	drain_finished();
	return latch_set;
}

/*
 * StripeClientSettingsChanged
 *		Apply settings that size the multi handle, after a reload or when
 *		the server turns out not to speak HTTP/2.
 */
void
StripeClientSettingsChanged(void)
{
	static int	logged_for = 0;
	long		connections;
	long		descriptors;

	if (multi == NULL)
		return;

	/*
	 * Every connection holds a descriptor, and fd.c grants a process only a
	 * third of its safe descriptors for such use.  Past that, sockets would
	 * fail to open and their requests be retried in a loop (measured: 512
	 * in flight delivered less than 256); capped, curl queues the excess
	 * until a connection is free.
	 */
	descriptors = Max(1, max_safe_fds / 3 - 8);
	if (stripe_meter_max_connections > 0)
		connections = stripe_meter_max_connections;
	else if (multiplexing())
		connections = H2_CONNECTIONS;
	else
	{
		/* HTTP/1.1: a connection per request in flight */
		connections = stripe_meter_max_in_flight;
		if (connections > descriptors && logged_for != stripe_meter_max_in_flight)
		{
			logged_for = stripe_meter_max_in_flight;
			ereport(LOG,
					(errmsg("stripe_meter worker can open only %ld connections, fewer than stripe_meter.max_in_flight (%d)",
							descriptors, stripe_meter_max_in_flight),
					 errhint("Raise max_files_per_process, and the server's open files limit, to about %d, or use HTTP/2.",
							 3 * stripe_meter_max_in_flight + 100)));
		}
	}
	connections = Min(connections, descriptors);

	/*
	 * The cache may hold more than are open at once: with room for exactly
	 * that many, curl closed an HTTP/2 connection whenever it replaced one
	 * (half of them in a test, each after a single round of streams).
	 */
	curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, 2 * connections);
	curl_multi_setopt(multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, connections);
	curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, connections);
}
