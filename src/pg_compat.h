/*-------------------------------------------------------------------------
 *
 * pg_compat.h
 *	  Every difference between the PostgreSQL majors stripe_meter builds
 *	  against (15 to 19), in one place, behind PG_VERSION_NUM.
 *
 * The rest of the code calls the names below and never tests the server
 * version itself.  Adding a major means reading its release notes' "source
 * code" section against this file.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/pg_compat.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef STRIPE_METER_PG_COMPAT_H
#define STRIPE_METER_PG_COMPAT_H

#include "common/jsonapi.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/latch.h"
#include "utils/guc.h"
#include "utils/wait_event.h"

#if PG_VERSION_NUM < 150000
#error "stripe_meter needs PostgreSQL 15 or later"
#endif

/* 18 moved the wait event set API out of latch.h */
#if PG_VERSION_NUM >= 180000
#include "storage/waiteventset.h"
#endif

/* 17 replaced IsBackgroundWorker with a test of the backend type */
#ifndef AmBackgroundWorkerProcess
#define AmBackgroundWorkerProcess() (MyBackendType == B_BG_WORKER)
#endif

/*
 * 19 compiles with -Wimplicit-fallthrough=5, which takes only the attribute
 * (not a comment) as the mark of an intended fall-through.
 */
#ifndef pg_fallthrough
#define pg_fallthrough __attribute__((fallthrough))
#endif

/*
 * JSON parser callbacks return an error code since 16 (void before).  A
 * callback is declared with JSON_CALLBACK_RESULT and ends with
 * JSON_CALLBACK_DONE.
 */
#if PG_VERSION_NUM >= 160000
#define JSON_CALLBACK_RESULT	JsonParseErrorType
#define JSON_CALLBACK_DONE		return JSON_SUCCESS
#else
#define JSON_CALLBACK_RESULT	void
#define JSON_CALLBACK_DONE		return
#endif

/*
 * 16 made the JSON lexer report a \u escape that the database encoding
 * cannot hold as a parse error; 15 raises an ERROR for it (in any encoding
 * but UTF8), so a reader of untrusted JSON must keep such escapes from it.
 */
#if PG_VERSION_NUM >= 160000
#define JSON_ESCAPES_MAY_RAISE	false
#else
#define JSON_ESCAPES_MAY_RAISE	true
#endif

/* 17: the caller may pass a lexer to fill (NULL: allocate one) */
#if PG_VERSION_NUM >= 170000
#define make_json_lexer(json, len, encoding) \
	makeJsonLexContextCstringLen(NULL, (json), (len), (encoding), true)
#else
#define make_json_lexer(json, len, encoding) \
	makeJsonLexContextCstringLen((json), (len), (encoding), true)
#endif

/*
 * 17: a wait event set belongs to a resource owner instead of a memory
 * context.  The client frees its set itself, so it is owned by nothing.
 */
#if PG_VERSION_NUM >= 170000
#define create_wait_event_set(cxt, nevents) CreateWaitEventSet(NULL, (nevents))
#else
#define create_wait_event_set(cxt, nevents) CreateWaitEventSet((cxt), (nevents))
#endif

/*
 * An index scan without instrumentation (18 added the argument) and with
 * no scan options (19 added them).  These expand where access/genam.h and
 * access/tableam.h are included.
 */
#if PG_VERSION_NUM >= 190000
#define begin_index_scan(heap, index, snapshot, nkeys) \
	index_beginscan((heap), (index), (snapshot), NULL, (nkeys), 0, SO_NONE)
#elif PG_VERSION_NUM >= 180000
#define begin_index_scan(heap, index, snapshot, nkeys) \
	index_beginscan((heap), (index), (snapshot), NULL, (nkeys), 0)
#else
#define begin_index_scan(heap, index, snapshot, nkeys) \
	index_beginscan((heap), (index), (snapshot), (nkeys), 0)
#endif

/* 19 added scan options to the sequential scan too */
#if PG_VERSION_NUM >= 190000
#define begin_table_scan(rel, snapshot) \
	table_beginscan((rel), (snapshot), 0, NULL, SO_NONE)
#else
#define begin_table_scan(rel, snapshot) \
	table_beginscan((rel), (snapshot), 0, NULL)
#endif

/*
 * String settings: since 16 the server frees a value, or the extra data of
 * a check hook, with guc_free(), so they must come from guc_malloc(); 15
 * frees them with free().  Both return NULL when memory runs out, after
 * reporting it at the given level.
 */
#if PG_VERSION_NUM < 160000
static inline void *
guc_malloc(int elevel, size_t size)
{
	void	   *p = malloc(size ? size : 1);

	if (p == NULL)
		ereport(elevel,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	return p;
}

static inline void
guc_free(void *ptr)
{
	free(ptr);
}
#endif

/*
 * 16 added the doubly linked list that counts its members (dclist).  For
 * 15, the part of it stripe_meter uses, with the same names and meaning.
 */
#include "lib/ilist.h"
#if PG_VERSION_NUM < 160000
typedef struct dclist_head
{
	dlist_head	dlist;
	uint32		count;
} dclist_head;

static inline void
dclist_init(dclist_head *head)
{
	dlist_init(&head->dlist);
	head->count = 0;
}

static inline bool
dclist_is_empty(const dclist_head *head)
{
	return head->count == 0;
}

static inline uint32
dclist_count(const dclist_head *head)
{
	return head->count;
}

static inline void
dclist_push_head(dclist_head *head, dlist_node *node)
{
	if (head->dlist.head.next == NULL)
		dclist_init(head);
	dlist_push_head(&head->dlist, node);
	head->count++;
}

static inline void
dclist_push_tail(dclist_head *head, dlist_node *node)
{
	if (head->dlist.head.next == NULL)
		dclist_init(head);
	dlist_push_tail(&head->dlist, node);
	head->count++;
}

static inline void
dclist_delete_from(dclist_head *head, dlist_node *node)
{
	Assert(head->count > 0);
	dlist_delete(node);
	head->count--;
}

static inline dlist_node *
dclist_pop_head_node(dclist_head *head)
{
	Assert(head->count > 0);
	head->count--;
	return dlist_pop_head_node(&head->dlist);
}

static inline dlist_node *
dclist_tail_node(dclist_head *head)
{
	Assert(head->count > 0);
	return dlist_tail_node(&head->dlist);
}

#define dclist_container(type, membername, ptr) \
	dlist_container(type, membername, ptr)
#define dclist_head_element(type, membername, lhead) \
	dlist_head_element(type, membername, &(lhead)->dlist)
#define dclist_foreach(iter, lhead) \
	dlist_foreach(iter, &((lhead)->dlist))
#define dclist_foreach_modify(iter, lhead) \
	dlist_foreach_modify(iter, &((lhead)->dlist))
#endif

/*
 * 19: a background worker that DROP DATABASE, ALTER DATABASE ... RENAME
 * and CREATE DATABASE ... TEMPLATE may stop, as they stop a backend
 * connected to that database (WITH (FORCE) aside); before 19 such commands
 * fail while the worker is connected.
 */
#ifdef BGWORKER_INTERRUPTIBLE
#define WORKER_STOPPED_BY_DATABASE_COMMANDS BGWORKER_INTERRUPTIBLE
#else
#define WORKER_STOPPED_BY_DATABASE_COMMANDS 0
#endif

/*
 * 17: custom wait events, named in pg_stat_activity.wait_event; before,
 * every wait of an extension shows as "Extension".
 */
#if PG_VERSION_NUM >= 170000
#define HAVE_NAMED_WAIT_EVENTS 1
#define register_wait_event(name) WaitEventExtensionNew(name)
#else
#define register_wait_event(name) ((void) (name), PG_WAIT_EXTENSION)
#endif

#endif							/* STRIPE_METER_PG_COMPAT_H */
