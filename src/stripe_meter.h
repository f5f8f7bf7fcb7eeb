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
 *				carries the same body and Idempotency-Key, both fixed by
 *				its row when it was queued
 *	delivered	Stripe accepted the event: moved to stripe_meter.meter_events
 *	failed		the event can never succeed as it is: moved to
 *				stripe_meter.failed_events with the reason
 *	launcher	the one background worker that starts a delivery worker for
 *				each database where the extension exists
 *	store		the table-I/O layer: store.c, store_*.c and delivery_store.c
 *				hold every SPI call and every SQL text
 *	rollup		one event the worker forms from the events of a meter with a
 *				rollup window that share an account, customer, dimension
 *				values and window; they stay in meter_events as rolled_up
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

#include "access/htup.h"
#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/ilist.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/jsonb.h"
#include "utils/relcache.h"
#include "utils/reltrigger.h"
#include "utils/tuplestore.h"

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
extern bool stripe_meter_http2;
extern int	stripe_meter_max_connections;
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
extern int	stripe_meter_unknown_meter;
extern int	stripe_meter_meter_sync_interval;
extern int	stripe_meter_error_poll_interval;
extern int	stripe_meter_rollup_settle_delay;

/* stripe_meter.api_version */
typedef enum StripeApiVersion
{
	STRIPE_API_V1 = 1,			/* POST /v1/billing/meter_events, one event */
	STRIPE_API_V2				/* meter event stream, batches of 100 */
} StripeApiVersion;

/* stripe_meter.unknown_meter */
typedef enum UnknownMeterAction
{
	UNKNOWN_METER_ERROR,
	UNKNOWN_METER_WARNING
} UnknownMeterAction;

extern void StripeMeterDefineSettings(void);
extern bool StripeMeterUrlIsAllowed(const char *url, const char **why);
extern int	StripeMeterEffectiveRateLimit(void);

/* ---- in rate_limiter.c: one token bucket per Stripe account ---- */
extern void RateLimiterInit(MemoryContext cxt);
extern bool RateLimiterTake(const char *account, TimestampTz now, long *wait_ms);
extern bool RateLimiterHasTokens(const char *account, TimestampTz now, int n);
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
extern char *MeterEventCanonicalValue(Jsonb *payload, const char *value_key);
extern void MeterEventWireText(const char *key, JsonbValue *value,
							   const char *value_key, const char *canonical_value,
							   StringInfo out);
extern char *MeterEventNewIdentifier(void);

/* ---- in store_probe.c (the validation trigger's lookups) ---- */
typedef struct EnqueueMeter
{
	bool		found;			/* the event name has a row in meters */
	char	   *customer_key;
	char	   *value_key;
	char	   *status;			/* NULL before 0.2.0 or when unknown */
	char	   *aggregation;	/* count, last, sum, or NULL when unknown */
	int64		rollup_window_secs; /* 0: each event is sent by itself */
} EnqueueMeter;

typedef enum EnqueueIdentifierUse
{
	ENQUEUE_ID_UNUSED = 0,
	ENQUEUE_ID_QUEUED,
	ENQUEUE_ID_DELIVERED,
	ENQUEUE_ID_FAILED
} EnqueueIdentifierUse;

extern void StoreProbeMeter(const char *event_name, EnqueueMeter *meter);
extern bool StoreProbeMetersSynced(void);
extern EnqueueIdentifierUse StoreProbeIdentifier(const char *identifier);

/* ---- in store.c (what the store files share) ---- */
extern SPIPlanPtr SpiPrepareSaved(const char *sql, int nargs, Oid *argtypes);
extern char *StoreResultText(uint64 row, int col, MemoryContext cxt);
extern Datum StoreResultDatum(uint64 row, int col, bool *isnull);
extern TimestampTz StoreResultTimestamp(uint64 row, int col);

/* ---- in store_outbox.c (enqueue-side SQL) ---- */
typedef struct FailedEventRef
{
	char	   *identifier;
	bool		maybe_billed;
} FailedEventRef;

extern text *StoreOutboxInsertEvent(const char *event_name, Jsonb *payload,
									const char *identifier, TimestampTz *ts,
									const char *stripe_account);
extern bool StoreOutboxRequeueFailed(const char *identifier, bool history);
extern List *StoreOutboxListFailed(bool history);

/* ---- in enqueue.c (the enqueue side's rules) ---- */
extern HeapTuple EnqueueOutboxRow(Relation rel, HeapTuple tuple);
extern void EnqueueUserRow(Trigger *trigger, Relation rel, HeapTuple tuple);
extern int64 EnqueueRetryFailed(const char *identifier, bool force, bool history);

/* ---- in shmem.c ---- */

/* A database's slot: its states and their changes are slots.c's. */
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
	int			stream_accounts;	/* accounts with API v2 state held */
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
extern void StripeMeterSetPaused(Oid dboid, const char *reason);
extern void StripeMeterSetLastError(Oid dboid, const char *error);
extern void StripeMeterSetStreamAccounts(Oid dboid, int n);
extern bool StripeMeterReadSlot(Oid dboid, DatabaseSlot *copy);

/* ---- in slots.c: the state machine of the database slots ---- */

/* What slots.c needs from the launcher, called with the lock held. */
typedef struct SlotLauncher
{
	/* register a worker for slot i; false when it could not */
	bool		(*start) (int i, Oid dboid);
	/* has the worker registered for slot i stopped?  false: not ours */
	bool		(*watch) (int i, bool *gone);
} SlotLauncher;

extern DatabaseSlot *StripeMeterFindSlot(Oid dboid);
extern bool StripeMeterNotifyLauncher(Oid dboid);
extern void SlotsForgetGone(bool (*known) (Oid dboid));
extern long SlotsTend(const SlotLauncher *launcher);
extern bool SlotTakeForWorker(void);
extern void SlotLeaveByWorker(bool extension_absent);

/* ---- in launcher.c ---- */
extern void StripeMeterRegisterLauncher(void);
extern PGDLLEXPORT void StripeMeterLauncherMain(Datum main_arg);

/* ---- in worker.c: the delivery worker's process ---- */
extern PGDLLEXPORT void StripeMeterWorkerMain(Datum main_arg);
extern void WorkerBegin(bool say_stopping);

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
	bool		maybe_billed;	/* failed, yet Stripe may have billed it */
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

/*
 * One claimed event, held by the worker from claim to record.  The claim
 * fills in its row; the sender builds its request (body, key) from it.
 */
typedef struct ClaimedEvent
{
	ClaimBatch *batch;
	uint64		busy_key;		/* hash of (account, event name, customer) */
	int64		id;
	char	   *identifier;
	char	   *event_name;
	char	   *customer;
	char	   *stripe_account; /* NULL when none */
	Jsonb	   *payload;		/* NULL once the request is built */
	char	   *value_key;		/* the meter's, frozen at enqueue */
	char	   *canonical_value;	/* NULL: queued before 0.2.0 */
	bool		legacy_idempotency_key; /* attempted before 0.2.0 */
	TimestampTz ts;
	TimestampTz unknown_outcome_since;	/* 0 when every attempt had an answer */
	int			attempts;
	char	   *body;			/* the request, as the sender encodes it */
	char	   *idempotency_key;	/* NULL when the sender sends none */
	TimestampTz next_attempt_at;	/* retried or paused: due again then */
	TimestampTz due_at;			/* when it fell due, as claimed */
	bool		sent;			/* handed to the network by this worker */
	bool		marked_by_claim;	/* the claim marked its row sent */
	bool		probe;			/* the one trial of its paused account */
	bool		reach_probe;	/* the one trial while Stripe does not answer */
	bool		v2_solo;		/* v2: send in a request of its own */
	bool		record_deferred;	/* its row was locked: record later */
	DeliveryOutcome outcome;
	dlist_node	node;			/* in one queue at a time */
} ClaimedEvent;

/* ---- in unreachable.c: one request at a time while Stripe does not answer ---- */
extern bool UnreachableMaySend(TimestampTz now, bool *probe, long *wait_ms);
extern void UnreachableProbeUnsent(void);
extern bool UnreachableNoteAttempt(bool answered, bool probe, const char *reason);
extern void UnreachableRetryNow(void);
extern bool UnreachableProbing(void);

/* ---- in pauses.c: delivery paused for the database or for one account ---- */
extern void PauseInit(MemoryContext cxt,
					  void (*release) (const char *account, TimestampTz not_before));
extern const char *PauseReason(void);
extern void PauseDelivery(const char *reason);
extern void PauseForSettings(void);
extern TimestampTz PauseRefused(const char *account, const DeliveryOutcome *o);
extern bool PauseAccountIsPaused(const char *account);
extern bool PauseAccountMaySend(const char *account, TimestampTz now,
								TimestampTz *not_before, bool *probe);
extern bool PauseAccountAnswered(const char *account, DeliveryVerdict verdict);
extern void PauseAccountProbeEnded(const char *account);
extern void PauseAccountsLoad(void);
extern void PauseAccountsResumeAll(void);

/* ---- senders: v1_sender.c and v2_stream.c put claimed events on the wire ---- */

/* What a sender needs from the scheduler. */
typedef struct SenderHooks
{
	/* an answer came and e->outcome is filled in: settle it */
	void		(*event_done) (ClaimedEvent *e);
	/* e did not go out after all, its outcome set: free its key, record it */
	void		(*event_dropped) (ClaimedEvent *e);

	/*
	 * these are about to go on the wire: keep in events[] those that may,
	 * marked sent, and return how many; the others are done with
	 */
	int			(*mark_sending) (ClaimedEvent **events, int n);
	/* not processed by Stripe: free the busy key and send it again soon */
	void		(*event_requeue) (ClaimedEvent *e);
	/* a session could not be created: pause, slow down, report */
	void		(*session_trouble) (const char *account, const DeliveryOutcome *outcome);
} SenderHooks;

/* What a sender does with an event handed over. */
typedef enum SenderTake
{
	SENDER_TAKEN,				/* it goes out (or is done with) */
	SENDER_DEFER,				/* its account must wait: *wait_ms */
	SENDER_FULL					/* nothing more fits now */
} SenderTake;

/*
 * One way to deliver meter events (one stripe_meter.api_version).  The
 * worker picks one at start; nothing else asks which API is in use.
 */
typedef struct Sender
{
	int			api_version;	/* the stripe_meter.api_version it serves */
	int			events_per_request; /* at most: sizes what the worker holds */
	bool		keyed;			/* each attempt carries the event's
								 * Idempotency-Key */
	bool		sends_at_once;	/* an event added goes out at the next flush */
	void		(*init) (MemoryContext cxt, const SenderHooks *hooks);

	/*
	 * build e's request from its row (in a transaction, in the current memory
	 * context)
	 */
	void		(*encode) (ClaimedEvent *e);
	char	   *(*destination) (void);	/* where it sends, for the log */
	bool		(*has_room) (void);

	/*
	 * how many more events the next flush could put on the wire at once (0
	 * when it cannot say): the claim marks that many sent itself
	 */
	int			(*room_now) (void);

	/*
	 * whether the sender itself would let an event of this account (NULL:
	 * the key's own) go at the next flush; called inside the claim, so it
	 * only looks (NULL: always)
	 */
	bool		(*account_ready) (const char *account, TimestampTz now);
	SenderTake	(*add) (ClaimedEvent *e, TimestampTz now, long *wait_ms);
	long		(*flush) (void);	/* ms until held-back events may go, or -1 */
	int			(*unsent) (void);
	void		(*release_unsent) (void);
	void		(*release_account) (const char *account, TimestampTz not_before);
} Sender;

/* ---- in v1_sender.c: one request per event ---- */
extern const Sender V1Sender;

/* ---- in json_encode.c ---- */
extern void JsonAppendRfc3339(StringInfo buf, TimestampTz ts);
extern char *JsonEncodeMeterEvent(const char *event_name, Jsonb *payload,
								  const char *identifier, TimestampTz ts,
								  const char *value_key,
								  const char *canonical_value);

/* ---- in form_encode.c ---- */
extern char *FormEncodeMeterEvent(const char *event_name, Jsonb *payload,
								  const char *identifier, TimestampTz ts,
								  const char *value_key,
								  const char *canonical_value);

/*
 * The kinds of request an Idempotency-Key is made for: each key starts with
 * its kind and a colon (or "_sha256:"), so no event's key can equal a
 * cancellation's, whatever the identifiers.
 */
#define IDEMPOTENCY_KIND_EVENT		"meter_event"
#define IDEMPOTENCY_KIND_ADJUSTMENT "meter_event_adjustment"

extern char *FormEncodeIdempotencyKey(const char *kind, const char *identifier);
extern char *FormEncodeLegacyIdempotencyKey(const char *identifier);

/* ---- in delivery_outcome.c ---- */
typedef struct HttpResult
{
	int			transport_code; /* 0 when a whole answer came; else the
								 * transfer failed (timeout, reset, ...) */
	const char *transport_error;
	bool		connected;		/* the request may have reached Stripe */
	long		status;
	const char *body;
	size_t		body_len;
	bool		body_truncated;
	const char *request_id;
	char		should_retry;	/* 't', 'f' or 0 when absent */
	bool		replayed;
	bool		with_account;	/* the request carried Stripe-Account */
} HttpResult;

extern void DeliveryClassify(const HttpResult *http, const char *identifier,
							 DeliveryOutcome *outcome);

/* ==== Reading Stripe's answers (stripe_response.c, stripe_classify.c) ==== */

/* ---- in stripe_response.c: the one reader of response bodies ---- */

/* The fields of one answer; a string is NULL when absent or not a string. */
typedef struct StripeResponse
{
	bool		valid;			/* one JSON object, storable as jsonb; else
								 * every field below is empty */
	char	   *object;			/* top-level "object" */
	char	   *id;
	/* Stripe's error object */
	bool		has_error;
	char	   *error_type;
	char	   *error_code;
	char	   *error_message;	/* whole, as Stripe wrote it */
	char	   *error_param;
	char	   *error_decline_code;
	char	   *error_doc_url;
	/* list pages: v1 data[] and has_more, v2 next_page_url */
	bool		has_data;		/* "data" is an array */
	int			data_count;
	char	   *data_last_id;	/* "id" of data's last element */
	bool		has_more;
	char	   *next_page_url;
	/* a v2 meter event session */
	char	   *authentication_token;	/* a credential: never logged */
	char	   *created;		/* v2 times: RFC 3339 text */
	char	   *expires_at;
} StripeResponse;

extern void StripeReadJson(const char *json, size_t len, StripeResponse *r);
extern void StripeReadAnswer(const HttpResult *http, StripeResponse *r);
extern bool StripeErrorMessageHas(const StripeResponse *r, const char *phrase);
extern bool StripeParseRfc3339(const char *s, TimestampTz *out);

/* ---- in stripe_classify.c: what an answer means, for any endpoint ---- */
typedef enum StripeVerdict
{
	STRIPE_SUCCESS,				/* the endpoint's own check is satisfied */
	STRIPE_RETRY,				/* try again later */
	STRIPE_FAIL,				/* the request can never succeed as it is */
	STRIPE_PAUSE_ACCOUNT,		/* refused for the Connect account it named */
	STRIPE_PAUSE_ALL			/* the key or the URL is wrong: stop sending */
} StripeVerdict;

/* the rung of the ladder that decided: callers word their reasons by it */
typedef enum StripeRule
{
	RULE_SUCCESS,
	RULE_NO_ANSWER,				/* no complete HTTP answer */
	RULE_SESSION_EXPIRED,		/* v2 stream: renew the session, resend */
	RULE_TOKEN_REFUSED,			/* v2 stream: another 401 for the token */
	RULE_KEY_REFUSED,			/* 401 */
	RULE_FORBIDDEN,				/* 403 */
	RULE_NOT_FOUND,				/* 404 from an endpoint that names no object */
	RULE_RATE_LIMITED,			/* 429 */
	RULE_UNCONFIRMED,			/* 200 without what the endpoint expects */
	RULE_REPLAYED_FAILURE,		/* a 409 or 5xx replayed for the key */
	RULE_NO_RETRY,				/* 409 or 5xx, Stripe-Should-Retry: false */
	RULE_TRANSIENT,				/* 409 or 5xx, or Stripe-Should-Retry: true */
	RULE_REFUSED,				/* another 4xx, in Stripe's error form */
	RULE_UNEXPECTED				/* not Stripe speaking (a proxy?) */
} StripeRule;

/* What the ladder must know about the endpoint besides the answer. */
typedef struct StripeEndpoint
{
	bool		v2;				/* API v2: Stripe's errors carry a message */
	bool		session_token;	/* authenticated with a session token */
	bool		names_object;	/* a 404 says the object named is missing */
} StripeEndpoint;

typedef struct StripeJudgement
{
	StripeVerdict verdict;
	StripeRule	rule;
	bool		rate_limited;	/* slow the sender down */
	bool		outcome_unknown;	/* Stripe may have processed it */
	bool		maybe_billed;	/* failed, yet Stripe may have billed it */
	bool		retry_now;		/* Stripe-Should-Retry: true */
	char	   *message;		/* Stripe's error message for a reason: one
								 * line, clipped; NULL when none */
} StripeJudgement;

extern void StripeClassify(const HttpResult *http, const StripeResponse *resp,
						   const StripeEndpoint *endpoint, bool success,
						   StripeJudgement *j);
extern char *StripeAnswerText(const HttpResult *http, const StripeResponse *resp);
extern char *StripeFailureText(const HttpResult *http);

/* ==== end of reading Stripe's answers ==== */

/* ---- in store_counters.c (the figures of stripe_meter.status) ---- */
extern void CountersDelivered(int64 n);
extern void CountersNotBilled(int64 n);

/* ---- in delivery_store.c (the worker's SQL) ---- */
extern bool DeliveryStoreBegin(void);
extern void DeliveryStoreCommit(void);
extern bool DeliveryStoreExtensionVersion(char *buf, size_t size);
extern int64 DeliveryStoreRepair(TimestampTz claimed_before);
/*
 * How many more events of this busy key may be claimed; more: it has more
 * due; walked: the claim's walk came to it (else it was named to refill).
 * Sets *send_now when its first may go on the wire as soon as the claim
 * commits: the claim then marks it sent itself.
 */
typedef int (*ClaimRoomFunc) (uint64 busy_key, const char *account, bool more,
							  bool walked, bool *send_now);

/* a busy key by its parts, account "" when none */
typedef struct ClaimKey
{
	const char *customer;
	const char *event_name;
	const char *account;
	TimestampTz due_from;		/* its events due before were claimed (one
								 * committed late is the walk's to find) */
} ClaimKey;
#define CLAIM_PER_KEY 2			/* events held per (account, meter, customer) */
extern uint64 DeliveryBusyKey(const char *account, const char *event_name,
							  const char *customer);
extern int	DeliveryStoreClaim(int limit, const ClaimKey *refill, int nrefill,
							   bool walk, ClaimRoomFunc room, ClaimBatch *batch,
							   dlist_head *claimed);
extern int	DeliveryStoreMarkSent(ClaimedEvent **events, int n);
extern TimestampTz DeliveryStoreRecord(ClaimedEvent **events, int n, int *deferred);
#define PURGE_BATCH 5000		/* delivered rows deleted per purge transaction */
extern int64 DeliveryStorePurgeDelivered(void);
extern void DeliveryStorePauseAccount(const char *account, const char *reason,
									  long http_status, TimestampTz next_try_at);
extern void DeliveryStoreResumeAccount(const char *account);
extern void DeliveryStoreLoadPausedAccounts(void (*found) (const char *account,
														   TimestampTz next_try_at));

/* ---- in delivery_policy.c: when an event may go, and when it goes again ---- */
extern int	DeliveryBackoffMs(int attempts);
extern TimestampTz DeliveryNextAttempt(const ClaimedEvent *e, TimestampTz now);
extern const char *DeliveryUnsendableReason(const ClaimedEvent *e, TimestampTz now);

/* ---- in stripe_client.c: the one HTTP client (the only user of libcurl) ---- */
typedef void (*StripeDoneCallback) (void *owner, const HttpResult *http);

extern void StripeClientInit(void);
extern const char *StripeKeyProblem(void);

/* One request: where to, what, and with which credentials and headers. */
typedef struct StripeRequestSpec
{
	void	   *owner;
	StripeDoneCallback done;	/* called with the answer */
	const char *base_url;		/* stripe_meter.api_url or .stream_url */
	const char *path;			/* with the query string, if any */
	const char *body;			/* a POST's body; NULL: a GET */
	const char *content_type;	/* NULL: form encoding */
	const char *bearer;			/* NULL: the API key */
	const char *idempotency_key;	/* NULL: none */
	const char *stripe_account; /* NULL: none */
	bool		stripe_context; /* name the account in Stripe-Context */
	bool		lifecycle;		/* not a delivery: StripeClientInFlight()
								 * does not count it */
} StripeRequestSpec;

/* in the worker: requests on one multi handle, and the wait that drives them */
extern bool StripeClientStartRequest(const StripeRequestSpec *spec);
extern int	StripeClientInFlight(void);
extern int	StripeClientDropUnsent(const char *why);
extern bool StripeClientWait(long timeout_ms, uint32 wait_event_info);
extern void StripeClientSettingsChanged(void);
extern HttpResult *StripeHttpResultCopy(const HttpResult *http);
/* in a backend: one request at a time, waited for */
extern bool StripeClientPerform(const StripeRequestSpec *spec, HttpResult *result);
extern char *StripeClientGetJson(const char *path, const char *stripe_account);
extern void StripeClientAppendEscaped(StringInfo buf, const char *s, int len);

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

extern void V2SessionSetup(MemoryContext cxt, const SenderHooks *hooks);
extern void V2SessionInit(V2Session *s, const char *account);
extern bool V2SessionHasToken(const V2Session *s, TimestampTz now);
extern bool V2SessionUsable(V2Session *s, TimestampTz now, long *wait_ms);
extern void V2SessionExpired(V2Session *s, uint64 generation);
extern void V2SessionFree(V2Session *s);

/* ---- in v2_stream.c: batches of events on the meter event stream ---- */
extern const Sender V2Sender;

/* ---- in lifecycle.c: the worker's jobs after delivery, and their requests ---- */

/* A job's requests in flight, and the answers that came back for its run. */
typedef struct LifecycleCalls
{
	MemoryContext cxt;			/* the run's memory, freed when it ends */
	int			in_flight;
	bool		abandoned;		/* the run ended in an ERROR: drop answers */
	List	   *answers;		/* LifecycleAnswer *, not yet read */
} LifecycleCalls;

typedef struct LifecycleAnswer
{
	void	   *arg;			/* as given to LifecycleCallStart */
	HttpResult *http;
} LifecycleAnswer;

extern void LifecycleCallsInit(LifecycleCalls *calls, const char *name);
extern bool LifecycleCallStart(LifecycleCalls *calls, const StripeRequestSpec *spec, void *arg);
extern LifecycleAnswer *LifecycleCallNextAnswer(LifecycleCalls *calls);
extern void LifecycleCallsEnd(LifecycleCalls *calls);
extern void LifecycleWorkerRepair(void);
extern long LifecycleWorkerTick(bool paused, bool woken);

/*
 * The jobs (cancel.c, meter_sync.c, async_errors.c).  A start step begins a
 * run, an advance step reads the answers that arrived; each returns true
 * while the run goes on, and never waits for Stripe.
 */
extern LifecycleCalls CancelCalls;
extern bool CancelRunStart(void);
extern bool CancelRunAdvance(void);
extern TimestampTz CancelRunNextDue(void);
extern void CancelRepair(void);
extern LifecycleCalls MeterSyncCalls;
extern bool MeterSyncRunStart(void);
extern bool MeterSyncRunAdvance(void);
extern void MeterSyncCheckEnqueue(const char *event_name, const EnqueueMeter *meter,
								  const char *stripe_account);
extern LifecycleCalls AsyncErrorsCalls;
extern bool AsyncErrorsRunStart(void);
extern bool AsyncErrorsRunAdvance(void);
extern bool ListPageNext(const char *body, size_t len, bool *has_more, char **last_id);

/* ---- what sql_functions.c calls: cancel.c, meter_sync.c, reconcile.c ---- */
extern const char *CancelEvent(const char *event_name, const char *identifier);
extern int	MeterSyncNow(void);

/* the arguments of stripe_meter_reconcile(), checked */
typedef struct ReconcileRequest
{
	const char *event_name;
	const char *customer;
	TimestampTz from;
	TimestampTz to;
	const char *grouping;		/* "day", "hour", or NULL: one window */
	const char *account;		/* NULL: the key's own */
} ReconcileRequest;

extern void ReconcileRun(const ReconcileRequest *req, Tuplestorestate *tupstore,
						 TupleDesc tupdesc);

/* ---- in store_cancel.c (the SQL of cancellations) ---- */

/* Where an event to cancel is, as the lookups find it. */
typedef struct CancelTarget
{
	char	   *event_name;
	char	   *stripe_account; /* NULL when none */
	bool		maybe_sent;		/* queued: in flight, or an outcome unknown */
	TimestampTz received_at;	/* delivered: when Stripe received it */
	char	   *reason;			/* failed: why */
	bool		maybe_billed;	/* failed: Stripe may have billed it */
	char	   *rollup_identifier;	/* delivered: the rollup that carried it */
} CancelTarget;

/* One cancellation claimed by the worker. */
typedef struct ClaimedCancel
{
	char	   *identifier;
	char	   *event_name;
	char	   *stripe_account;
	TimestampTz received_at;	/* 0 when unknown */
	TimestampTz unknown_outcome_since;
	int			attempts;
} ClaimedCancel;

/* What became of one claimed cancellation. */
typedef struct CancelRecord
{
	const char *identifier;
	const char *status;			/* done, failed, or NULL: retried */
	const char *outcome;		/* created, replayed, already_cancelled, ... */
	const char *adjustment;		/* Stripe's object (JSON), or NULL */
	const char *request_id;
	long		http_status;	/* 0 when no answer */
	const char *reason;
	TimestampTz next_attempt_at;
	bool		unknown;		/* retried, and Stripe may have it */
} CancelRecord;

extern bool StoreCancelFindQueued(const char *identifier, CancelTarget *found);
extern void StoreCancelRemoveQueued(const char *identifier);
extern bool StoreCancelFindDelivered(const char *identifier, CancelTarget *found);
extern bool StoreCancelFindFailed(const char *identifier, CancelTarget *found);
extern bool StoreCancelFindAdjustment(const char *identifier, char **status,
									  char **last_error);
extern void StoreCancelQueue(const char *identifier, const char *event_name,
							 const char *stripe_account, const char *status,
							 const TimestampTz *received_at);
extern void StoreCancelRepair(void);
extern void StoreCancelPromoteAwaiting(void);
extern int	StoreCancelClaim(int limit, MemoryContext cxt, ClaimedCancel **claimed);
extern void StoreCancelRecord(const CancelRecord *r);
extern TimestampTz StoreCancelNextDue(void);

/* ---- in store_meters.c (the SQL of stripe_meter.meters) ---- */
extern int	StoreMetersReplace(List *pages);
extern void StoreMetersSyncError(const char *error);
extern bool StoreMetersFind(const char *event_name, char **meter_id,
							char **aggregation, char **value_key);

/* ---- in store_errors.c (the SQL of Stripe's error reports) ---- */
typedef struct ErrorReportAccount
{
	char	   *account;		/* NULL: the key's own account */
	char	   *cursor;			/* RFC 3339, or NULL: from the start */
} ErrorReportAccount;

extern List *StoreErrorsAccounts(int overlap_secs, int max_accounts, MemoryContext cxt);
extern void StoreErrorsApplyPage(const char *page, const char *account);
extern void StoreErrorsRecordRead(const char *error);

/* ---- in rollup.c: many events of one group and window sent as one ---- */
#define ROLLUP_ID_PREFIX "stripe_meter_rollup_"
#define ROLLUP_MAX_VALUE INT64CONST(999999999999999)	/* STRIPE_MAX_VALUE_DIGITS */
#define ROLLUP_FORM_LIMIT 50000 /* events rolled up per transaction */

typedef struct RollupSource
{
	int64		id;
	char	   *group_hash;
	TimestampTz window_end;
	char	   *formula;		/* sum or last */
	char	   *event_name;
	char	   *stripe_account; /* NULL: the platform */
	char	   *customer;
	char	   *dimensions;		/* the payload without its value, as jsonb text */
	char	   *value_key;
	char	   *value;			/* canonical digits */
	TimestampTz ts;
	TimestampTz enqueued_at;
} RollupSource;

typedef struct RollupPart
{
	char	   *identifier;
	char	   *group_hash;
	TimestampTz window_end;
	int			generation;
	int			part;
	const char *event_name;
	const char *stripe_account;
	const char *customer;
	const char *formula;
	int			events;
	const char *dimensions;
	const char *value_key;
	char	   *value;
	TimestampTz ts;				/* the latest event's */
	TimestampTz enqueued_at;	/* that event's */
} RollupPart;

extern bool RollupForming(void);
extern bool RollupIsIdentifier(const char *identifier);
extern void RollupCheckIdentifier(const char *identifier);
extern TimestampTz RollupWindowEnd(TimestampTz ts, int64 window_secs);
extern TimestampTz RollupFormDue(TimestampTz now, bool *formed);

/* ---- in store_rollup.c (the SQL of rollups) ---- */
extern List *StoreRollupDueSources(TimestampTz closed_by, int limit, MemoryContext cxt);
extern int	StoreRollupNextGeneration(const char *group_hash, TimestampTz window_end);
extern void StoreRollupQueue(const RollupPart *r);
extern void StoreRollupRetire(int64 *ids, char **rollup_ids, int n);
extern TimestampTz StoreRollupOldestWindow(void);

/* ---- in store_reconcile.c (the SQL of stripe_meter_reconcile()) ---- */
extern bool StoreReconcilePickMeter(const char *page, const char *event_name,
									char **meter_id, char **aggregation);
extern void StoreReconcileCompare(List *pages, int64 from_secs, int64 to_secs, int64 step,
								  const char *event_name, const char *customer,
								  const char *account, const char *aggregation,
								  const char *value_key,
								  Tuplestorestate *tupstore, TupleDesc tupdesc);

/* wait_events.c: what pg_stat_activity.wait_event shows */
typedef enum StripeMeterWait
{
	SM_WAIT_STRIPE,				/* requests in flight: Stripe's answers */
	SM_WAIT_CLAIM,				/* nothing to claim: new events or the poll */
	SM_WAIT_RECORD,				/* gathering answers into one record batch */
	SM_WAIT_RATE_LIMIT,			/* the next rate-limit token */
	SM_WAIT_PAUSED,				/* delivery paused */
	SM_WAIT_UNREACHABLE,		/* Stripe does not answer: the next probe */
	SM_WAIT_LAUNCHER,			/* the launcher, between scans */
	SM_WAIT_COUNT
} StripeMeterWait;

extern uint32 StripeMeterWaitEvent(StripeMeterWait wait);

/* ---- in scheduler.c: the worker's claimed events, from claim to record ---- */
extern void SchedulerInit(MemoryContext cxt, const Sender *sender);
extern void SchedulerWake(void);
extern bool SchedulerDrained(void);
extern void SchedulerCounts(int *nheld, int *nready);
extern bool SchedulerTurn(TimestampTz now, bool draining);
extern long SchedulerTimeout(StripeMeterWait *wait);

#endif							/* STRIPE_METER_H */
