/*-------------------------------------------------------------------------
 *
 * pauses.c
 *	  Delivery paused for the whole database (the key or URL is wrong,
 *	  delivery is off, the schema is not updated), or for one Connect
 *	  account that Stripe refused.
 *
 * A database-wide pause lasts until a reload fixes its cause; it is
 * published in the worker's slot (status.paused).  While paused, nothing
 * is claimed and claimed events that were never sent go back untouched.
 *
 * A Connect account Stripe refused (401, 403, 404) waits alone: its events
 * stay queued until next_try_at, when one of them goes out (the probe) to
 * see whether access is back; every other account is delivered meanwhile.
 * stripe_meter.paused_accounts holds the same, for status and for a worker
 * that starts later.  The table wins: it is read again at every claim, so
 * stripe_meter_resume_account() takes effect at once.  At most one probe
 * per account is out at a time.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/pauses.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

#define PAUSED_ACCOUNT_LEN	256

typedef struct PausedAccount
{
	char		account[PAUSED_ACCOUNT_LEN];	/* hash key */
	TimestampTz next_try_at;
	bool		probing;		/* an event is out to try it again */
	bool		seen;			/* still in the table at the last load */
} PausedAccount;

static char pause_reason[WORKER_TEXT_LEN];	/* empty while delivering */
static HTAB *paused_accounts = NULL;
static void (*release_account) (const char *account, TimestampTz not_before);

/*
 * PauseInit
 *		Make the table of paused accounts.  release is called when an
 *		account is paused, to take back its events not yet sent.
 */
void
PauseInit(MemoryContext cxt, void (*release) (const char *account,
											  TimestampTz not_before))
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = PAUSED_ACCOUNT_LEN;
	ctl.entrysize = sizeof(PausedAccount);
	ctl.hcxt = cxt;
	paused_accounts = hash_create("stripe_meter paused accounts", 16, &ctl,
								  HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	release_account = release;
}

/*
 * PauseReason
 *		Why delivery is paused for the database, or NULL.
 */
const char *
PauseReason(void)
{
	return pause_reason[0] != '\0' ? pause_reason : NULL;
}

/*
 * PauseDelivery
 *		Pause delivery for the database, saying why; NULL resumes it.  Said
 *		in the log and in the slot once per change.
 */
void
PauseDelivery(const char *reason)
{
	if (reason == NULL)
	{
		if (pause_reason[0] != '\0')
			ereport(LOG, (errmsg("stripe_meter worker resumed delivery")));
		pause_reason[0] = '\0';
		StripeMeterSetPaused(MyDatabaseId, NULL);
		return;
	}
	if (strcmp(pause_reason, reason) != 0)
	{
		strlcpy(pause_reason, reason, sizeof(pause_reason));
		ereport(LOG,
				(errmsg("stripe_meter worker paused delivery: %s", reason),
				 errhint("Events stay queued.  Delivery resumes after the configuration is fixed and reloaded.")));
		StripeMeterSetPaused(MyDatabaseId, reason);
	}
}

/*
 * Why delivery cannot run with the current settings, or NULL.  Never
 * quotes the key.
 */
static const char *
settings_problem(void)
{
	const char *key = stripe_meter_api_key;
	const char *p;

	if (!stripe_meter_enabled)
		return "delivery is turned off (stripe_meter.enabled)";
	if (key == NULL || key[0] == '\0')
		return "stripe_meter.api_key is not set";
	if (!(strncmp(key, "sk_", 3) == 0 || strncmp(key, "rk_", 3) == 0))
		return "stripe_meter.api_key is not a Stripe secret or restricted key (sk_... or rk_...)";
	for (p = key; *p; p++)
		if (*p <= 0x20 || *p >= 0x7f)
			return "stripe_meter.api_key contains spaces or control characters";
	return NULL;
}

/*
 * PauseForSettings
 *		At start and after a reload (how a key or URL problem gets fixed):
 *		pause or resume delivery as the settings allow.
 */
void
PauseForSettings(void)
{
	PauseDelivery(settings_problem());
}

static PausedAccount *
account_paused(const char *account)
{
	char		key[PAUSED_ACCOUNT_LEN];

	if (account == NULL || hash_get_num_entries(paused_accounts) == 0 ||
		strlen(account) >= PAUSED_ACCOUNT_LEN)
		return NULL;
	memset(key, 0, sizeof(key));
	strlcpy(key, account, sizeof(key));
	return hash_search(paused_accounts, key, HASH_FIND, NULL);
}

static PausedAccount *
remember_paused(const char *account, TimestampTz next_try_at, bool *found)
{
	char		key[PAUSED_ACCOUNT_LEN];
	PausedAccount *pa;

	memset(key, 0, sizeof(key));
	strlcpy(key, account, sizeof(key));
	pa = hash_search(paused_accounts, key, HASH_ENTER, found);
	if (!*found)
		pa->probing = false;
	pa->next_try_at = next_try_at;
	pa->seen = true;
	return pa;
}

static void
paused_account_loaded(const char *account, TimestampTz next_try_at)
{
	bool		found;

	if (strlen(account) < PAUSED_ACCOUNT_LEN)
		(void) remember_paused(account, next_try_at, &found);
}

/*
 * PauseAccountsLoad
 *		Read stripe_meter.paused_accounts (in the caller's transaction): an
 *		operator may have resumed accounts.
 */
void
PauseAccountsLoad(void)
{
	HASH_SEQ_STATUS seq;
	PausedAccount *pa;

	hash_seq_init(&seq, paused_accounts);
	while ((pa = hash_seq_search(&seq)) != NULL)
		pa->seen = false;
	DeliveryStoreLoadPausedAccounts(paused_account_loaded);
	hash_seq_init(&seq, paused_accounts);
	while ((pa = hash_seq_search(&seq)) != NULL)
		if (!pa->seen)
			hash_search(paused_accounts, pa->account, HASH_REMOVE, NULL);
}

/*
 * Stripe refused a request for this Connect account: pause the account
 * alone, its events kept.  Returns when it is tried again.
 */
static TimestampTz
pause_account(const char *account, const DeliveryOutcome *o)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next_try_at = TimestampTzPlusMilliseconds(now,
														  stripe_meter_account_retry_interval * 1000L);
	PausedAccount *pa = account_paused(account);
	bool		found;

	/* the other answers of the same refusal: once is enough */
	if (pa != NULL && !pa->probing &&
		pa->next_try_at > TimestampTzPlusMilliseconds(now, stripe_meter_account_retry_interval * 500L))
		return pa->next_try_at;
	pa = remember_paused(account, next_try_at, &found);
	pa->probing = false;
	WorkerBegin(false);
	DeliveryStorePauseAccount(account, o->reason, o->http_status, next_try_at);
	DeliveryStoreCommit();
	if (!found)
		ereport(LOG,
				(errmsg("stripe_meter worker paused delivery for Stripe account %s: %s",
						account, o->reason ? o->reason : "refused"),
				 errhint("Its events stay queued, and every other account is delivered.  It is tried again every stripe_meter.account_retry_interval, or at once after stripe_meter_resume_account() or a configuration reload.")));
	release_account(account, next_try_at);
	return next_try_at;
}

/*
 * PauseRefused
 *		Stripe refused a request (VERDICT_PAUSE): pause the Connect account
 *		it was for, or delivery as a whole when it was for the key's own
 *		account.  Returns when the account is tried again; 0 when delivery
 *		as a whole was paused.
 */
TimestampTz
PauseRefused(const char *account, const DeliveryOutcome *o)
{
	if (account != NULL && strlen(account) < PAUSED_ACCOUNT_LEN)
		return pause_account(account, o);
	PauseDelivery(o->reason);
	return 0;
}

/*
 * PauseAccountIsPaused
 *		Whether delivery is paused for this account (NULL: the key's own,
 *		which is never paused alone).
 */
bool
PauseAccountIsPaused(const char *account)
{
	return account_paused(account) != NULL;
}

/*
 * PauseAccountMaySend
 *		May an event of this account go out now?  When its account is
 *		paused and due to be tried, it may, as the probe (*probe set; an
 *		event already holding the probe, put back by its sender, still
 *		may).  When false, *not_before says when to claim it again.
 */
bool
PauseAccountMaySend(const char *account, TimestampTz now, TimestampTz *not_before,
					bool *probe)
{
	PausedAccount *pa = account_paused(account);

	if (pa == NULL)
		return true;
	if (*probe && pa->probing)
		return true;
	if (now < pa->next_try_at || pa->probing)
	{
		*not_before = Max(pa->next_try_at,
						  TimestampTzPlusMilliseconds(now, stripe_meter_naptime));
		return false;
	}
	pa->probing = true;
	*probe = true;
	return true;
}

/*
 * PauseAccountProbeEnded
 *		The probe of this account is done with, answered or not: dropped
 *		before it went out (too old, its row locked), the account may be
 *		tried again at its next turn instead of waiting for a reload.
 */
void
PauseAccountProbeEnded(const char *account)
{
	PausedAccount *pa = account_paused(account);

	if (pa != NULL)
		pa->probing = false;
}

/*
 * PauseAccountAnswered
 *		Stripe answered a request sent for this account.  An answer that
 *		got past Stripe's access check (delivered, or failed on its own
 *		merits) resumes a paused account: returns true then.
 */
bool
PauseAccountAnswered(const char *account, DeliveryVerdict verdict)
{
	PausedAccount *pa = account_paused(account);
	char		name[PAUSED_ACCOUNT_LEN];

	if (pa == NULL)
		return false;
	if (verdict != VERDICT_DELIVERED && verdict != VERDICT_FAIL)
	{
		pa->probing = false;
		return false;
	}
	strlcpy(name, pa->account, sizeof(name));
	hash_search(paused_accounts, name, HASH_REMOVE, NULL);
	WorkerBegin(false);
	DeliveryStoreResumeAccount(name);
	DeliveryStoreCommit();
	ereport(LOG,
			(errmsg("stripe_meter worker resumed delivery for Stripe account %s", name)));
	return true;
}

/*
 * PauseAccountsResumeAll
 *		A reload resumes every paused account.
 */
void
PauseAccountsResumeAll(void)
{
	HASH_SEQ_STATUS seq;
	PausedAccount *pa;

	if (hash_get_num_entries(paused_accounts) == 0)
		return;
	hash_seq_init(&seq, paused_accounts);
	while ((pa = hash_seq_search(&seq)) != NULL)
		hash_search(paused_accounts, pa->account, HASH_REMOVE, NULL);
	WorkerBegin(false);
	DeliveryStoreResumeAccount(NULL);
	DeliveryStoreCommit();
}
