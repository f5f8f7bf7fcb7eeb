/*-------------------------------------------------------------------------
 *
 * stripe_response.c
 *	  The one reader of Stripe's response bodies: a single pass of
 *	  PostgreSQL's JSON parser (pg_parse_json with semantic callbacks) that
 *	  fills a StripeResponse with the few fields anyone reads: the top-level
 *	  "object" and "id", Stripe's error object, list paging (v1 has_more and
 *	  data[], v2 next_page_url) and the fields of a v2 meter event session.
 *	  Also Stripe's RFC 3339 times, and the paging of v1 lists.
 *
 * Invariants:
 *	- Nothing here raises an ERROR for what a server sent: the worker calls
 *	  it outside any transaction, with no error handler.  Whatever could
 *	  make the parser raise one (nesting deeper than the stack allows, on
 *	  15 a \u escape the database encoding cannot hold) is ruled out before
 *	  the parse.
 *	- A body is read all or nothing: either it is one JSON object that
 *	  jsonb_in would also accept (valid: the caller may store it as jsonb)
 *	  and its fields are filled, or every field is empty.
 *	- A field is filled only when its value is a JSON string (has_more: the
 *	  JSON true); of duplicate keys the last counts, as in jsonb.
 *	- The parse's garbage goes into a memory context of its own; the
 *	  fields are copied into the caller's context.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/stripe_response.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "utils/datetime.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/* deeper than any answer of Stripe's; the parser recurses per level */
#define MAX_NESTING		64

/* the deepest level read: the "id" of an element of "data" */
#define READ_DEPTH		3

/* what the container open at one depth is, for the reader */
typedef enum Container
{
	IN_OTHER = 0,				/* nothing read in it */
	IN_TOP,						/* the top-level object */
	IN_ERROR,					/* the top-level object's "error" */
	IN_DATA,					/* the top-level object's "data" array */
	IN_ITEM						/* an object in "data" */
} Container;

typedef struct ReadState
{
	StripeResponse *r;
	int			depth;			/* containers open */
	Container	in[READ_DEPTH + 1]; /* in[d]: the container at depth d */
	char	   *field[READ_DEPTH + 1];	/* in[d]'s current key, if an object */
	bool		numbers_ok;		/* every number fits jsonb's numeric */
} ReadState;

/* The string fields read, by container and key, and where each goes. */
typedef struct StringField
{
	Container	in;
	const char *key;
	size_t		offset;			/* of its char * in StripeResponse */
} StringField;

static const StringField string_fields[] = {
	{IN_TOP, "object", offsetof(StripeResponse, object)},
	{IN_TOP, "id", offsetof(StripeResponse, id)},
	{IN_TOP, "next_page_url", offsetof(StripeResponse, next_page_url)},
	{IN_TOP, "authentication_token", offsetof(StripeResponse, authentication_token)},
	{IN_TOP, "created", offsetof(StripeResponse, created)},
	{IN_TOP, "expires_at", offsetof(StripeResponse, expires_at)},
	{IN_ERROR, "type", offsetof(StripeResponse, error_type)},
	{IN_ERROR, "code", offsetof(StripeResponse, error_code)},
	{IN_ERROR, "message", offsetof(StripeResponse, error_message)},
	{IN_ERROR, "param", offsetof(StripeResponse, error_param)},
	{IN_ERROR, "decline_code", offsetof(StripeResponse, error_decline_code)},
	{IN_ERROR, "doc_url", offsetof(StripeResponse, error_doc_url)},
	{IN_ITEM, "id", offsetof(StripeResponse, data_last_id)},
};

/*
 * The slot for a string field of container c, or NULL when that key is
 * not read.
 */
static char **
string_slot(StripeResponse *r, Container c, const char *key)
{
	int			i;

	for (i = 0; i < lengthof(string_fields); i++)
		if (string_fields[i].in == c && strcmp(string_fields[i].key, key) == 0)
			return (char **) ((char *) r + string_fields[i].offset);
	return NULL;
}

/* a container opens at depth s->depth + 1: what is it to the reader? */
static Container
opening(ReadState *s, bool is_object)
{
	int			d = s->depth;	/* the parent's depth */
	StripeResponse *r = s->r;

	if (d == 0)
		return is_object ? IN_TOP : IN_OTHER;
	if (d > READ_DEPTH - 1)
		return IN_OTHER;
	if (s->in[d] == IN_TOP && s->field[d] != NULL)
	{
		if (is_object && strcmp(s->field[d], "error") == 0)
		{
			r->has_error = true;
			return IN_ERROR;
		}
		if (!is_object && strcmp(s->field[d], "data") == 0)
		{
			r->has_data = true;
			return IN_DATA;
		}
	}
	if (s->in[d] == IN_DATA && is_object)
		return IN_ITEM;
	return IN_OTHER;
}

static JSON_CALLBACK_RESULT
read_object_start(void *state)
{
	ReadState  *s = state;
	Container	c = opening(s, true);

	s->depth++;
	if (s->depth <= READ_DEPTH)
	{
		s->in[s->depth] = c;
		s->field[s->depth] = NULL;
	}
	JSON_CALLBACK_DONE;
}

static JSON_CALLBACK_RESULT
read_array_start(void *state)
{
	ReadState  *s = state;
	Container	c = opening(s, false);

	s->depth++;
	if (s->depth <= READ_DEPTH)
	{
		s->in[s->depth] = c;
		s->field[s->depth] = NULL;
	}
	JSON_CALLBACK_DONE;
}

static JSON_CALLBACK_RESULT
read_container_end(void *state)
{
	((ReadState *) state)->depth--;
	JSON_CALLBACK_DONE;
}

/* a key: a later duplicate replaces what an earlier one gave */
static JSON_CALLBACK_RESULT
read_field_start(void *state, char *fname, bool isnull)
{
	ReadState  *s = state;
	StripeResponse *r = s->r;
	char	  **slot;

	if (s->depth > READ_DEPTH || fname == NULL)
		JSON_CALLBACK_DONE;
	s->field[s->depth] = fname;
	slot = string_slot(r, s->in[s->depth], fname);
	if (slot != NULL)
		*slot = NULL;
	if (s->in[s->depth] == IN_TOP)
	{
		if (strcmp(fname, "has_more") == 0)
			r->has_more = false;
		else if (strcmp(fname, "error") == 0)
		{
			r->has_error = false;
			r->error_type = r->error_code = r->error_message = NULL;
			r->error_param = r->error_decline_code = r->error_doc_url = NULL;
		}
		else if (strcmp(fname, "data") == 0)
		{
			r->has_data = false;
			r->data_count = 0;
			r->data_last_id = NULL;
		}
	}
	JSON_CALLBACK_DONE;
}

static JSON_CALLBACK_RESULT
read_element_start(void *state, bool isnull)
{
	ReadState  *s = state;

	if (s->depth <= READ_DEPTH && s->in[s->depth] == IN_DATA)
	{
		s->r->data_count++;
		s->r->data_last_id = NULL;	/* only the last element's id counts */
	}
	JSON_CALLBACK_DONE;
}

/*
 * numeric_in raises an ERROR for absurd numbers (too long, or an exponent
 * beyond its range such as 1e999999): such a body is not stored, so not read
 */
static bool
number_fits(const char *token)
{
	const char *e;

	if (strlen(token) > 100)
		return false;
	if ((e = strpbrk(token, "eE")) != NULL)
	{
		long		exponent = strtol(e + 1, NULL, 10);

		if (exponent > 1000 || exponent < -1000)
			return false;
	}
	return true;
}

static JSON_CALLBACK_RESULT
read_scalar(void *state, char *token, JsonTokenType tokentype)
{
	ReadState  *s = state;
	const char *key;
	char	  **slot;

	if (token == NULL)
		JSON_CALLBACK_DONE;
	if (tokentype == JSON_TOKEN_NUMBER && !number_fits(token))
		s->numbers_ok = false;
	if (s->depth < 1 || s->depth > READ_DEPTH || s->field[s->depth] == NULL)
		JSON_CALLBACK_DONE;
	key = s->field[s->depth];
	if (s->in[s->depth] == IN_TOP && strcmp(key, "has_more") == 0)
		s->r->has_more = (tokentype == JSON_TOKEN_TRUE);
	else if (tokentype == JSON_TOKEN_STRING &&
			 (slot = string_slot(s->r, s->in[s->depth], key)) != NULL)
		*slot = token;			/* the parser hands its strings over */
	JSON_CALLBACK_DONE;
}

/*
 * What the parser must not see: nesting deeper than max_depth (it checks
 * the stack depth with an ERROR), and, where the parser raises an ERROR
 * for a \u escape the database encoding may not hold, any non-ASCII one.
 */
static bool
safe_to_parse(const char *json, size_t len, int max_depth)
{
	int			depth = 0;
	bool		in_string = false;
	bool		check_escapes = JSON_ESCAPES_MAY_RAISE &&
		GetDatabaseEncoding() != PG_UTF8;
	size_t		i;

	for (i = 0; i < len; i++)
	{
		char		c = json[i];

		if (in_string)
		{
			if (c == '\\')
			{
				/* \u0080 and above: two hex digits past "\u00" */
				if (check_escapes && i + 5 < len && json[i + 1] == 'u' &&
					!(json[i + 2] == '0' && json[i + 3] == '0' &&
					  json[i + 4] >= '0' && json[i + 4] <= '7'))
					return false;
				i++;
			}
			else if (c == '"')
				in_string = false;
		}
		else if (c == '"')
			in_string = true;
		else if (c == '{' || c == '[')
		{
			if (++depth > max_depth)
				return false;
		}
		else if (c == '}' || c == ']')
			depth--;
	}
	return true;
}

static char *
copy_field(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

/*
 * StripeReadJson
 *		Read the JSON text json (len bytes, not necessarily terminated) into
 *		*r, its strings palloc'd in the current memory context.  r->valid
 *		says whether it was one JSON object that jsonb_in would accept; if
 *		not, every field is empty.
 */
void
StripeReadJson(const char *json, size_t len, StripeResponse *r)
{
	MemoryContext caller = CurrentMemoryContext;
	MemoryContext parse_cxt;
	StripeResponse got;
	ReadState	s;
	JsonSemAction sem;
	JsonLexContext *lex;
	JsonParseErrorType rc;
	size_t		i = 0;

	memset(r, 0, sizeof(*r));
	if (json == NULL)
		return;
	while (i < len && (json[i] == ' ' || json[i] == '\t' || json[i] == '\r' || json[i] == '\n'))
		i++;
	if (i == len || json[i] != '{' || memchr(json, '\0', len) != NULL)
		return;
	if (!pg_verify_mbstr(GetDatabaseEncoding(), json, len, true))
		return;
	if (!safe_to_parse(json, len, MAX_NESTING))
		return;

	parse_cxt = AllocSetContextCreate(caller, "stripe_meter response",
									  ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(parse_cxt);
	memset(&got, 0, sizeof(got));
	memset(&s, 0, sizeof(s));
	s.r = &got;
	s.numbers_ok = true;
	memset(&sem, 0, sizeof(sem));
	sem.semstate = &s;
	sem.object_start = read_object_start;
	sem.object_end = read_container_end;
	sem.array_start = read_array_start;
	sem.array_end = read_container_end;
	sem.object_field_start = read_field_start;
	sem.array_element_start = read_element_start;
	sem.scalar = read_scalar;
	lex = make_json_lexer(pnstrdup(json, len), len, GetDatabaseEncoding());
	rc = pg_parse_json(lex, &sem);
	MemoryContextSwitchTo(caller);

	if (rc == JSON_SUCCESS && s.numbers_ok)
	{
		r->valid = true;
		r->object = copy_field(got.object);
		r->id = copy_field(got.id);
		r->has_error = got.has_error;
		r->error_type = copy_field(got.error_type);
		r->error_code = copy_field(got.error_code);
		r->error_message = copy_field(got.error_message);
		r->error_param = copy_field(got.error_param);
		r->error_decline_code = copy_field(got.error_decline_code);
		r->error_doc_url = copy_field(got.error_doc_url);
		r->has_data = got.has_data;
		r->data_count = got.data_count;
		r->data_last_id = copy_field(got.data_last_id);
		r->has_more = got.has_more;
		r->next_page_url = copy_field(got.next_page_url);
		r->authentication_token = copy_field(got.authentication_token);
		r->created = copy_field(got.created);
		r->expires_at = copy_field(got.expires_at);
	}
	/* the token is a credential: leave no copy in freed memory */
	if (got.authentication_token != NULL)
		explicit_bzero(got.authentication_token, strlen(got.authentication_token));
	MemoryContextDelete(parse_cxt);
}

/*
 * StripeReadAnswer
 *		Read the body of an HTTP answer; nothing when there was no complete
 *		answer (a transfer error, or a body cut at the size limit).
 */
void
StripeReadAnswer(const HttpResult *http, StripeResponse *r)
{
	if (http->transport_code != 0 || http->body_truncated)
		memset(r, 0, sizeof(*r));
	else
		StripeReadJson(http->body, http->body_len, r);
}

/*
 * StripeErrorMessageHas
 *		Whether Stripe's error message contains this phrase: for the answers
 *		Stripe gives no error code of their own.
 */
bool
StripeErrorMessageHas(const StripeResponse *r, const char *phrase)
{
	return r->error_message != NULL && strstr(r->error_message, phrase) != NULL;
}

/*
 * ListPageNext
 *		For a Stripe v1 list page: whether there is more, and the id of its
 *		last object (the next page's starting_after).  False when the body
 *		is not a list.
 */
bool
ListPageNext(const char *body, size_t len, bool *has_more, char **last_id)
{
	StripeResponse r;

	StripeReadJson(body, len, &r);
	*has_more = false;
	*last_id = NULL;
	if (!r.has_data)
		return false;
	*last_id = r.data_last_id;
	*has_more = r.has_more && r.data_last_id != NULL;
	return true;
}

/* n decimal digits at s, as a number; -1 if they are not all digits */
static int
digits(const char *s, int n)
{
	int			v = 0;
	int			i;

	for (i = 0; i < n; i++)
	{
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (s[i] - '0');
	}
	return v;
}

/*
 * StripeParseRfc3339
 *		Parse an RFC 3339 date-time as Stripe's v2 API writes them
 *		("2026-01-01T00:00:00.123Z", or an offset instead of Z).  False if
 *		s is not one.
 */
bool
StripeParseRfc3339(const char *s, TimestampTz *out)
{
	struct pg_tm tm;
	fsec_t		fsec = 0;
	int			tz = 0;
	const char *p;

	if (s == NULL || strlen(s) < 20)
		return false;
	memset(&tm, 0, sizeof(tm));
	tm.tm_year = digits(s, 4);
	tm.tm_mon = digits(s + 5, 2);
	tm.tm_mday = digits(s + 8, 2);
	tm.tm_hour = digits(s + 11, 2);
	tm.tm_min = digits(s + 14, 2);
	tm.tm_sec = digits(s + 17, 2);
	if (s[4] != '-' || s[7] != '-' || strchr("Tt ", s[10]) == NULL ||
		s[13] != ':' || s[16] != ':' ||
		tm.tm_year < 1 || tm.tm_mon < 1 || tm.tm_mon > MONTHS_PER_YEAR ||
		tm.tm_mday < 1 || tm.tm_mday > day_tab[isleap(tm.tm_year)][tm.tm_mon - 1] ||
		tm.tm_hour < 0 || tm.tm_hour > 23 || tm.tm_min < 0 || tm.tm_min > 59 ||
		tm.tm_sec < 0 || tm.tm_sec > 60)
		return false;
	p = s + 19;
	if (*p == '.')
	{
		int			scale = 100000;

		if (p[1] < '0' || p[1] > '9')
			return false;
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
		int			hh = digits(p + 1, 2);
		int			mm = strlen(p) >= 6 ? digits(p + 4, 2) : -1;

		if (hh < 0 || hh > 23 || p[3] != ':' || mm < 0 || mm > 59)
			return false;
		/* PostgreSQL counts zones in seconds west of Greenwich */
		tz = (hh * SECS_PER_HOUR + mm * SECS_PER_MINUTE) * (*p == '+' ? -1 : 1);
		p += 6;
	}
	else
		return false;
	if (*p != '\0')
		return false;
	/* a leap second is the last second of its minute */
	if (tm.tm_sec == 60)
	{
		tm.tm_sec = 59;
		fsec = USECS_PER_SEC - 1;
	}
	return tm2timestamp(&tm, fsec, &tz, out) == 0;
}
