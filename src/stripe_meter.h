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

#ifndef STRIPE_METER_VERSION
#define STRIPE_METER_VERSION "0.0.0"
#endif

/* Stripe's limits, from ../shared/stripe/api-facts.md */
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
extern int	stripe_meter_delivered_retention;
extern int	stripe_meter_max_databases;
extern int	stripe_meter_launcher_naptime;

extern void StripeMeterDefineSettings(void);
extern bool StripeMeterUrlIsAllowed(const char *url, const char **why);
extern int	StripeMeterEffectiveRateLimit(void);

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

/* ---- in outbox.c (enqueue-side SQL) ---- */
extern SPIPlanPtr SpiPrepareSaved(const char *sql, int nargs, Oid *argtypes);
extern void OutboxLookupMeterKeys(const char *event_name,
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
	const char *delivery;		/* created, replayed, already_existed */
	bool		rate_limited;	/* a 429: slow the whole sender down */
	bool		outcome_unknown;	/* Stripe may have processed it */
	bool		retry_now;		/* Stripe-Should-Retry: true */
	long		http_status;	/* 0 when no response */
	char	   *reason;			/* for people: why it failed or is retried */
	char	   *response_json;	/* valid JSON body, or NULL */
	char		request_id[64];
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
	DeliveryOutcome outcome;
	struct ClaimedEvent *next;	/* queue links */
} ClaimedEvent;

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
extern void DeliveryStoreRepair(void);
extern int	DeliveryStoreClaim(int limit, ClaimBatch *batch, ClaimedEvent **head,
							   ClaimedEvent **tail);
extern TimestampTz DeliveryStoreRecord(ClaimedEvent *done);
extern int64 DeliveryStorePurgeDelivered(void);
extern int	DeliveryBackoffMs(int attempts);

/* ---- in stripe_client.c (libcurl only) ---- */
typedef void (*StripeDoneCallback) (void *owner, const HttpResult *http);

extern void StripeClientInit(void);
extern bool StripeClientStart(void *owner, const char *path, const char *body,
							  const char *idempotency_key,
							  const char *stripe_account);
extern int	StripeClientInFlight(void);
extern bool StripeClientWait(long timeout_ms, StripeDoneCallback done);
extern void StripeClientSettingsChanged(void);
extern void StripeClientAppendEscaped(StringInfo buf, const char *s, int len);

#endif							/* STRIPE_METER_H */
