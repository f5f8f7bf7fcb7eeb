/*-------------------------------------------------------------------------
 *
 * store.c
 *	  What the store files share.  The store files (store_*.c and
 *	  delivery_store.c) are the one table-I/O layer of stripe_meter: every
 *	  SPI call and every SQL text is in them, and the rest of the code
 *	  calls them with C values and gets C values back.
 *
 * A store function either runs inside the worker's short transactions
 * (DeliveryStoreBegin ... DeliveryStoreCommit, SPI connected) or makes
 * its own SPI connection for its statements; each says which.  Results
 * are copied into the memory context that was current when it was called,
 * so they outlive the SPI connection.  Statements take their values as
 * parameters, never spliced into the SQL text, and those run again and
 * again keep their plan for the life of the backend.
 *
 * Copyright (c) 2026, stripe_meter developers
 *
 * IDENTIFICATION
 *	  src/store.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"
#include "utils/timestamp.h"

#include "stripe_meter.h"

/*
 * SpiPrepareSaved
 *		Prepare a statement and keep its plan for the life of the backend.
 *		SPI must be connected.
 *
 * Table names are schema-qualified, and the plan cache revalidates the
 * plan if the extension is dropped and created again.
 */
SPIPlanPtr
SpiPrepareSaved(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed for \"%s\": %s",
			 sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

/*
 * StoreResultText
 *		Column col (from 1) of row row of the last result, as text in cxt;
 *		NULL when it is NULL.
 */
char *
StoreResultText(uint64 row, int col, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	char	   *value = SPI_getvalue(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col);

	MemoryContextSwitchTo(old);
	return value;
}

/*
 * StoreResultDatum
 *		Column col (from 1) of row row of the last result.  A value passed
 *		by reference lives in SPI's memory: copy it before SPI_finish.
 */
Datum
StoreResultDatum(uint64 row, int col, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, isnull);
}

/*
 * StoreResultTimestamp
 *		A timestamptz column of the last result; 0 when it is NULL.
 */
TimestampTz
StoreResultTimestamp(uint64 row, int col)
{
	bool		isnull;
	Datum		d = StoreResultDatum(row, col, &isnull);

	return isnull ? 0 : DatumGetTimestampTz(d);
}
