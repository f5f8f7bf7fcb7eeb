/*-------------------------------------------------------------------------
 *
 * json_encode.c
 *	  Turn a queued event into the JSON object the v2 meter event stream
 *	  expects, one element of its "events" array:
 *		{"event_name":"...","identifier":"...",
 *		 "payload":{"KEY":"VALUE",...},"timestamp":"2026-01-01T00:00:00.000Z"}
 *
 * Payload values are all strings (Stripe's schema says so); the usage
 * value is sent as the canonical text validation stored in the row at
 * enqueue, like the v1 form encoding.  The output is a pure function of
 * the stored row.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/json_encode.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/*
 * JsonAppendRfc3339
 *		Append ts as an RFC 3339 UTC time with milliseconds, truncated
 *		toward the past.
 */
void
JsonAppendRfc3339(StringInfo buf, TimestampTz ts)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
		elog(ERROR, "timestamp out of range");
	appendStringInfo(buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
					 tm.tm_year, tm.tm_mon, tm.tm_mday,
					 tm.tm_hour, tm.tm_min, tm.tm_sec, (int) (fsec / 1000));
}

/*
 * JsonEncodeMeterEvent
 *		The JSON object for one event, palloc'd in the current context.
 */
char *
JsonEncodeMeterEvent(const char *event_name, Jsonb *payload,
					 const char *identifier, TimestampTz ts,
					 const char *value_key, const char *canonical_value)
{
	StringInfoData buf;
	StringInfoData text;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	char	   *key = NULL;
	bool		first = true;

	initStringInfo(&buf);
	initStringInfo(&text);

	appendStringInfoString(&buf, "{\"event_name\":");
	escape_json(&buf, event_name);
	appendStringInfoString(&buf, ",\"identifier\":");
	escape_json(&buf, identifier);
	appendStringInfoString(&buf, ",\"payload\":{");

	it = JsonbIteratorInit(&payload->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			key = pnstrdup(v.val.string.val, v.val.string.len);
			continue;
		}
		if (tok != WJB_VALUE)
			continue;

		resetStringInfo(&text);
		MeterEventWireText(key, &v, value_key, canonical_value, &text);
		if (!first)
			appendStringInfoChar(&buf, ',');
		first = false;
		escape_json(&buf, key);
		appendStringInfoChar(&buf, ':');
		escape_json(&buf, text.data);
		pfree(key);
	}

	appendStringInfoString(&buf, "},\"timestamp\":\"");
	JsonAppendRfc3339(&buf, ts);
	appendStringInfoString(&buf, "\"}");

	pfree(text.data);
	return buf.data;
}
