/*-------------------------------------------------------------------------
 *
 * stripe_meter.h
 *	  The one private header of stripe_meter: constants, shared structs,
 *	  settings and the functions each file offers the others.
 *
 * Glossary:
 *	event		one meter event: event name, payload, identifier, timestamp
 *	outbox		stripe_meter.outbox, the events not yet delivered
 *	claim		the worker marks events in flight (in_flight_since) and counts
 *				the attempt before any byte of them goes on the wire
 *	attempt		one HTTP request for one event; every attempt of an event
 *				carries the same Idempotency-Key (its identifier)
 *	delivered	Stripe accepted the event: moved to stripe_meter.meter_events
 *	failed		the event can never succeed as it is: moved to
 *				stripe_meter.failed_events with the reason
 *	launcher	the one background worker that starts a delivery worker for
 *				each database where the extension exists
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/stripe_meter.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef STRIPE_METER_H
#define STRIPE_METER_H

#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/jsonb.h"

#include "pg_compat.h"

#ifndef STRIPE_METER_VERSION
#define STRIPE_METER_VERSION "0.0.0"
#endif

/* Stripe's documented limits for meter events */
#define STRIPE_MAX_NAME_CHARS		100 /* event_name, identifier */
#define STRIPE_MAX_PAYLOAD_VALUE_CHARS 100
#define STRIPE_MAX_PAYLOAD_KEY_CHARS 100	/* not in the schema: as for the values */
#define STRIPE_MAX_VALUE_DIGITS		15
#define STRIPE_TS_PAST_LIMIT_SECS	(35 * SECS_PER_DAY)
#define STRIPE_TS_FUTURE_LIMIT_SECS (5 * SECS_PER_MINUTE)

#define DEFAULT_CUSTOMER_KEY		"stripe_customer_id"
#define DEFAULT_VALUE_KEY			"value"

/* ---- in guc.c ---- */
extern bool stripe_meter_enabled;
extern char *stripe_meter_api_key;
extern char *stripe_meter_api_url;
extern char *stripe_meter_stripe_version;
extern char *stripe_meter_ca_file;
extern int	stripe_meter_max_in_flight;
extern int	stripe_meter_connect_timeout;
extern int	stripe_meter_request_timeout;
extern int	stripe_meter_retry_min_delay;
extern int	stripe_meter_retry_max_delay;
extern int	stripe_meter_rate_limit;
extern int	stripe_meter_claim_batch_size;
extern int	stripe_meter_naptime;
extern int	stripe_meter_resend_window;
extern int	stripe_meter_account_retry_interval;
extern int	stripe_meter_delivered_retention;
extern int	stripe_meter_max_databases;
extern int	stripe_meter_launcher_naptime;
extern int	stripe_meter_api_version;
extern char *stripe_meter_stream_url;

/* stripe_meter.api_version */
typedef enum StripeApiVersion
{
	STRIPE_API_V1 = 1,			/* POST /v1/billing/meter_events, one event */
	STRIPE_API_V2				/* meter event stream, batches of 100 */
} StripeApiVersion;

extern void StripeMeterDefineSettings(void);
extern bool StripeMeterUrlIsAllowed(const char *url, const char **why);
extern int	StripeMeterEffectiveRateLimit(void);

/* ---- in rate_limiter.c: one token bucket per Stripe account ---- */
extern void RateLimiterInit(MemoryContext cxt);
extern bool RateLimiterTake(const char *account, TimestampTz now, long *wait_ms);
extern void RateLimiterAnswer(const char *account, bool rate_limited);
extern void RateLimiterTick(TimestampTz now);

/* ---- in event_validate.c ---- */

/* Everything Stripe checks about one event, as stored in the outbox. */
typedef struct MeterEventInput
{
	const char *event_name;		/* NULL when the column is NULL */
	Jsonb	   *payload;		/* NULL when the column is NULL */
	const char *identifier;
	TimestampTz ts;
	TimestampTz reference_time; /* when it was enqueued: the window's anchor */
	const char *stripe_account; /* NULL when none */
	const char *customer_key;	/* the meter's payload keys */
	const char *value_key;
} MeterEventInput;

extern char *MeterEventValidate(const MeterEventInput *event);
extern bool MeterEventValueText(JsonbValue *value, StringInfo out);
extern void MeterEventScalarText(JsonbValue *value, StringInfo out);
extern char *MeterEventNewIdentifier(void);

/* ---- in enqueue_probe.c (the validation trigger's lookups) ---- */
typedef struct EnqueueMeter
{
	bool		found;			/* the event name has a row in meters */
	char	   *customer_key;
	char	   *value_key;
	char	   *status;			/* NULL before 0.2.0 or when unknown */
} EnqueueMeter;

typedef enum EnqueueIdentifierUse
{
	ENQUEUE_ID_UNUSED = 0,
	ENQUEUE_ID_QUEUED,
	ENQUEUE_ID_DELIVERED,
	ENQUEUE_ID_FAILED
} EnqueueIdentifierUse;

extern void EnqueueProbeMeter(const char *event_name, EnqueueMeter *meter);
extern bool EnqueueProbeMetersSynced(void);
extern EnqueueIdentifierUse EnqueueProbeIdentifier(const char *identifier);

/* ---- in outbox.c (enqueue-side SQL) ---- */
extern SPIPlanPtr SpiPrepareSaved(const char *sql, int nargs, Oid *argtypes);
extern void OutboxLookupMeterKeys(const char *event_name,
								  char **customer_key, char **value_key);
extern void OutboxMeterKeys(const EnqueueMeter *meter,
							char **customer_key, char **value_key);
extern void OutboxCheckIdentifierUnused(const char *identifier);
extern int64 OutboxRetryFailed(const char *identifier);
extern text *OutboxInsertEvent(const char *event_name, Jsonb *payload,
							   const char *identifier, TimestampTz *ts,
							   const char *stripe_account);

/* ---- in shmem.c ---- */

/*
 * A database's slot.  The launcher moves it REQUESTED -> STARTING; the
 * worker moves it to RUNNING once it has found the extension, and on exit
 * to FREE (no extension) or STOPPED (anything else: restart it).
 */
typedef enum DatabaseSlotState
{
	SLOT_FREE = 0,
	SLOT_REQUESTED,				/* wants a worker (new database, CREATE
								 * EXTENSION, an enqueue with no worker) */
	SLOT_STARTING,				/* registered by the launcher */
	SLOT_RUNNING,				/* delivering */
	SLOT_STOPPED				/* exited unexpectedly; restart after a pause */
} DatabaseSlotState;

#define WORKER_TEXT_LEN 512

typedef struct DatabaseSlot
{
	Oid			dboid;
	DatabaseSlotState state;
	pid_t		pid;
	Latch	   *latch;			/* the worker's latch, NULL when none */
	bool		probe_requested;	/* told again while starting or stopping */
	TimestampTz started_at;
	TimestampTz stopped_at;
	char		paused[WORKER_TEXT_LEN];	/* empty when delivering */
	char		last_error[WORKER_TEXT_LEN];
	TimestampTz last_error_at;
} DatabaseSlot;

typedef struct StripeMeterShared
{
	LWLock	   *lock;
	Latch	   *launcher_latch;
	pid_t		launcher_pid;
	int			nslots;
	DatabaseSlot slots[FLEXIBLE_ARRAY_MEMBER];
} StripeMeterShared;

extern StripeMeterShared *StripeMeterShmem;

extern void StripeMeterShmemRequest(void);
extern void StripeMeterShmemStartup(void);
extern void StripeMeterWakeAtCommit(void);
extern bool StripeMeterNotifyLauncher(Oid dboid);
extern DatabaseSlot *StripeMeterFindSlot(Oid dboid);
extern void StripeMeterSetPaused(Oid dboid, const char *reason);
extern void StripeMeterSetLastError(Oid dboid, const char *error);

/* ---- in launcher.c ---- */
extern void StripeMeterRegisterLauncher(void);
extern PGDLLEXPORT void StripeMeterLauncherMain(Datum main_arg);

/* ---- in worker.c ---- */
extern PGDLLEXPORT void StripeMeterWorkerMain(Datum main_arg);

/* ---- delivery: the types shared by the worker's files ---- */

/* How one attempt ended, as delivery_outcome.c classifies it. */
typedef enum DeliveryVerdict
{
	VERDICT_DELIVERED,			/* Stripe has the event */
	VERDICT_RETRY,				/* try again later with the same key */
	VERDICT_FAIL,				/* can never succeed as it is */
	VERDICT_PAUSE,				/* the key or URL is wrong: stop sending */
	VERDICT_RELEASE				/* never sent: back to the queue untouched */
} DeliveryVerdict;

typedef struct DeliveryOutcome
{
	DeliveryVerdict verdict;
	const char *delivery;		/* created, replayed, already_existed,
								 * accepted (v2) */
	const char *session_id;		/* v2: the meter event session used */
	bool		rate_limited;	/* a 429: slow the whole sender down */
	bool		outcome_unknown;	/* Stripe may have processed it */
	bool		retry_now;		/* Stripe-Should-Retry: true */
	long		http_status;	/* 0 when no response */
	char	   *reason;			/* for people: why it failed or is retried */
	char	   *response_json;	/* valid JSON body, or NULL */
	char		request_id[64];
	TimestampTz not_before;		/* retry or release: not before this (0:
								 * the usual) */
} DeliveryOutcome;

/* The events of one claim share a memory context, freed with the last. */
typedef struct ClaimBatch
{
	MemoryContext cxt;
	int			live;			/* events not yet recorded */
} ClaimBatch;

/* One claimed event, held by the worker from claim to record. */
typedef struct ClaimedEvent
{
	ClaimBatch *batch;
	uint64		busy_key;		/* hash of (account, event name, customer) */
	char	   *idempotency_key;
	int64		id;
	char	   *identifier;
	char	   *event_name;
	char	   *customer;
	char	   *stripe_account; /* NULL when none */
	char	   *body;			/* the form-encoded request */
	TimestampTz ts;
	TimestampTz unknown_outcome_since;	/* 0 when every attempt had an answer */
	int			attempts;
	bool		sent;			/* handed to the network by this worker */
	bool		v2_solo;		/* v2: send in a request of its own */
	bool		record_deferred;	/* its row was locked: record later */
	DeliveryOutcome outcome;
	struct ClaimedEvent *next;	/* queue links */
} ClaimedEvent;

/* ---- in json_encode.c ---- */
extern void JsonAppendRfc3339(StringInfo buf, TimestampTz ts);
extern char *JsonEncodeMeterEvent(const char *event_name, Jsonb *payload,
								  const char *identifier, TimestampTz ts,
								  const char *value_key);

/* ---- in form_encode.c ---- */
extern char *FormEncodeMeterEvent(const char *event_name, Jsonb *payload,
								  const char *identifier, TimestampTz ts,
								  const char *value_key);
extern char *FormEncodeIdempotencyKey(const char *identifier);

/* ---- in delivery_outcome.c ---- */
typedef struct HttpResult
{
	int			curl_code;		/* CURLE_OK (0) when a response came */
	const char *curl_error;
	bool		connected;		/* the request may have reached Stripe */
	long		status;
	const char *body;
	size_t		body_len;
	bool		body_truncated;
	const char *request_id;
	char		should_retry;	/* 't', 'f' or 0 when absent */
	bool		replayed;
} HttpResult;

extern void DeliveryClassify(const HttpResult *http, const char *identifier,
							 DeliveryOutcome *outcome);
extern bool DeliveryJsonIsStorable(const char *json, size_t len);

/* ---- in delivery_store.c (the worker's SQL) ---- */
extern bool DeliveryStoreBegin(void);
extern void DeliveryStoreCommit(void);
extern bool DeliveryStoreExtensionVersion(char *buf, size_t size);
extern int64 DeliveryStoreRepair(TimestampTz claimed_before);
extern int	DeliveryStoreClaim(int limit, ClaimBatch *batch, ClaimedEvent **head,
							   ClaimedEvent **tail);
extern TimestampTz DeliveryStoreRecord(ClaimedEvent *done, int *deferred);
#define PURGE_BATCH 5000		/* delivered rows deleted per purge transaction */
extern int64 DeliveryStorePurgeDelivered(void);
extern void DeliveryStorePauseAccount(const char *account, const char *reason,
									  long http_status, TimestampTz next_try_at);
extern void DeliveryStoreResumeAccount(const char *account);
extern void DeliveryStoreLoadPausedAccounts(void (*found) (const char *account,
														   TimestampTz next_try_at));
extern int	DeliveryBackoffMs(int attempts);

/* ---- in stripe_client.c (libcurl only) ---- */
typedef void (*StripeDoneCallback) (void *owner, const HttpResult *http);

extern void StripeClientInit(void);
extern bool StripeClientStart(void *owner, const char *path, const char *body,
							  const char *idempotency_key,
							  const char *stripe_account);

/* One POST: where to, what, and with which credentials and headers. */
typedef struct StripeRequestSpec
{
	void	   *owner;
	StripeDoneCallback done;	/* NULL: the callback given to the wait */
	const char *base_url;		/* stripe_meter.api_url or .stream_url */
	const char *path;
	const char *body;
	const char *content_type;
	const char *bearer;			/* NULL: the API key */
	const char *idempotency_key;	/* NULL: none */
	const char *stripe_account; /* NULL: none */
} StripeRequestSpec;

extern bool StripeClientStartRequest(const StripeRequestSpec *spec);
extern int	StripeClientInFlight(void);
extern bool StripeClientWait(long timeout_ms, uint32 wait_event_info,
							 StripeDoneCallback done);
extern void StripeClientSettingsChanged(void);
extern void StripeClientAppendEscaped(StringInfo buf, const char *s, int len);
/* a libcurl easy handle (CURL *): its URL, TLS and transport settings */
extern void StripeCurlSetTransport(void *handle, const char *url);
struct curl_slist;
extern struct curl_slist *StripeCurlAddHeader(struct curl_slist *list, const char *fmt,
											  const char *value);

/* ---- API v2: the meter event stream ---- */

#define V2_MAX_BATCH_EVENTS	100 /* Stripe's limit per stream request */

/* ---- in v2_outcome.c ---- */
typedef struct V2SessionAnswer
{
	char	   *id;
	char	   *token;
	int64		lifetime_ms;	/* expires_at - created, as Stripe says */
} V2SessionAnswer;

typedef enum V2StreamVerdict
{
	V2_STREAM_ACCEPTED,			/* every event of the request accepted */
	V2_STREAM_SESSION_EXPIRED,	/* nothing processed: renew, resend at once */
	V2_STREAM_TOKEN_REFUSED,	/* drop the session; the outcome says retry */
	V2_STREAM_REFUSED,			/* the request as sent can never succeed */
	V2_STREAM_OTHER				/* the outcome applies to every event */
} V2StreamVerdict;

extern bool V2ClassifySession(const HttpResult *http, V2SessionAnswer *session,
							  DeliveryOutcome *outcome);
extern V2StreamVerdict V2ClassifyStream(const HttpResult *http,
										DeliveryOutcome *outcome);

/* What the v2 sender needs from the worker. */
typedef struct V2Hooks
{
	/* the outcome is filled in: record it (and free the busy key) */
	void		(*event_done) (ClaimedEvent *e);
	/* not processed by Stripe: free the busy key and send it again soon */
	void		(*event_requeue) (ClaimedEvent *e);
	/* one token of the request rate limiter, or when the next comes */
	bool		(*take_token) (const char *account, TimestampTz now, long *wait_ms);
	/* a session could not be created: pause, slow down, report */
	void		(*session_trouble) (const char *account, const DeliveryOutcome *outcome);
} V2Hooks;

/* ---- in v2_session.c: one meter event session per Connect account ---- */
typedef struct V2Session
{
	char	   *account;		/* Stripe-Account; NULL: the key's own */
	char	   *token;			/* a credential: never logged; NULL: none */
	char	   *id;
	uint64		generation;		/* bumped for every new session */
	TimestampTz renew_at;		/* local clock: ask for the next from then */
	TimestampTz expires_at;		/* local clock, with a safety margin */
	bool		creating;		/* a creation request is in flight */
	TimestampTz retry_at;		/* after a failed creation */
	int			failures;
} V2Session;

extern void V2SessionSetup(MemoryContext cxt, const V2Hooks *hooks);
extern void V2SessionInit(V2Session *s, const char *account);
extern bool V2SessionUsable(V2Session *s, TimestampTz now, long *wait_ms);
extern void V2SessionExpired(V2Session *s, uint64 generation);

/* ---- in v2_stream.c: batches of events on the meter event stream ---- */
extern void V2StreamInit(MemoryContext parent, const V2Hooks *hooks);
extern bool V2StreamAdd(ClaimedEvent *e);
extern long V2StreamFlush(void);
extern int	V2StreamUnsent(void);
extern void V2StreamReleaseUnsent(void);
extern void V2StreamReleaseAccount(const char *account, TimestampTz not_before);

/* ---- in stripe_sync.c (one synchronous request; outside the delivery loop) ---- */
extern const char *StripeSyncKeyProblem(void);
extern bool StripeSyncRequest(const char *method, const char *path, const char *body,
							  const char *idempotency_key, const char *stripe_account,
							  HttpResult *result);
extern char *StripeSyncErrorText(const HttpResult *http);
extern char *StripeSyncGetJson(const char *path, const char *stripe_account);

/* ---- the event lifecycle after delivery (cancel.c, meter_sync.c, async_errors.c) ---- */
extern int	stripe_meter_unknown_meter;
extern int	stripe_meter_meter_sync_interval;
extern int	stripe_meter_error_poll_interval;

typedef enum UnknownMeterAction
{
	UNKNOWN_METER_ERROR,
	UNKNOWN_METER_WARNING
} UnknownMeterAction;

extern void LifecycleDefineSettings(void);
extern void MeterSyncCheckEnqueue(const char *event_name, const EnqueueMeter *meter,
								  const char *stripe_account);
extern int	MeterSyncRun(void);
extern bool ListPageNext(const char *body, size_t len, bool *has_more, char **last_id);
extern void CancelRepair(void);
extern TimestampTz CancelDeliverDue(int limit);
extern void AsyncErrorsPull(void);
extern void LifecycleWorkerRepair(void);
extern long LifecycleWorkerTick(bool paused, bool woken);

/* wait_events.c: what pg_stat_activity.wait_event shows */
typedef enum StripeMeterWait
{
	SM_WAIT_STRIPE,				/* requests in flight: Stripe's answers */
	SM_WAIT_CLAIM,				/* nothing to claim: new events or the poll */
	SM_WAIT_RECORD,				/* gathering answers into one record batch */
	SM_WAIT_RATE_LIMIT,			/* the next rate-limit token */
	SM_WAIT_PAUSED,				/* delivery paused */
	SM_WAIT_LAUNCHER,			/* the launcher, between scans */
	SM_WAIT_COUNT
} StripeMeterWait;

extern uint32 StripeMeterWaitEvent(StripeMeterWait wait);

#endif							/* STRIPE_METER_H */
