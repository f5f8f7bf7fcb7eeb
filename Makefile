# stripe_meter: PGXS build.
#
# The control file is the single source of the version; the install script
# for that version is generated from stripe_meter.sql.

EXTENSION = stripe_meter
EXTVERSION = $(shell sed -n "s/^default_version = '\(.*\)'/\1/p" $(EXTENSION).control)

MODULE_big = stripe_meter
OBJS = \
	src/stripe_meter.o \
	src/guc.o \
	src/shmem.o \
	src/slots.o \
	src/event_validate.o \
	src/sql_functions.o \
	src/enqueue.o \
	src/store.o \
	src/store_outbox.o \
	src/store_probe.o \
	src/store_rollup.o \
	src/rollup.o \
	src/launcher.o \
	src/worker.o \
	src/scheduler.o \
	src/v1_sender.o \
	src/pauses.o \
	src/unreachable.o \
	src/delivery_store.o \
	src/store_counters.o \
	src/delivery_policy.o \
	src/stripe_response.o \
	src/stripe_classify.o \
	src/delivery_outcome.o \
	src/form_encode.o \
	src/json_encode.o \
	src/stripe_client.o \
	src/rate_limiter.o \
	src/v2_outcome.o \
	src/v2_session.o \
	src/v2_stream.o \
	src/lifecycle.o \
	src/cancel.o \
	src/store_cancel.o \
	src/meter_sync.o \
	src/store_meters.o \
	src/async_errors.o \
	src/store_errors.o \
	src/reconcile.o \
	src/store_reconcile.o \
	src/wait_events.o
PGFILEDESC = "stripe_meter - deliver meter events to Stripe"

DATA_built = $(EXTENSION)--$(EXTVERSION).sql
DATA = $(filter-out $(DATA_built),$(wildcard $(EXTENSION)--*--*.sql))
# The install scripts of released versions, frozen byte for byte (see
# released/README), so a database can still be created at an old version:
# the upgrade test starts from one.
DATA += $(wildcard released/$(EXTENSION)--*.sql)

PG_CPPFLAGS = -Isrc -DSTRIPE_METER_VERSION='"$(EXTVERSION)"' $(shell curl-config --cflags)
SHLIB_LINK = $(shell curl-config --libs)
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare

# pg_regress runs in its own throwaway instance that does not preload the
# library, so no worker touches the rows the SQL tests look at.
REGRESS = install event_create multibyte validation rollback outbox_insert event_trigger meters retry_failed privileges status reinstall retry_failed_notice trigger_numeric_nan meters_bracket_keys trigger_instead_of api_version lifecycle rollup_window
REGRESS_OPTS = --temp-instance=./tmp_regress --temp-config=test/regress.conf --encoding=UTF8

TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl

EXTRA_CLEAN = tmp_regress

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Makefile.global resets PROVE_FLAGS, so this must follow the include.
PROVE_FLAGS += -I test/perl

# Every source file includes the project's headers, and PGXS does not track
# them: a changed struct must rebuild every object that uses it.
$(OBJS) $(if $(filter yes,$(with_llvm)),$(OBJS:.o=.bc)): src/stripe_meter.h src/pg_compat.h

$(EXTENSION)--$(EXTVERSION).sql: $(EXTENSION).sql
	cp $< $@

# The long fuzz run of the enqueue validation (test/t/016_fuzz_input.pl):
# 200,000 generated events with a random seed, printed so that a failure can
# be replayed with STRIPE_METER_FUZZ_SEED=N.  Needs an installed build, like
# installcheck.
STRIPE_METER_FUZZ_CASES ?= 200000
STRIPE_METER_FUZZ_SEED ?= random
.PHONY: fuzz
fuzz: PROVE_TESTS = test/t/016_fuzz_input.pl
fuzz:
	STRIPE_METER_FUZZ_CASES=$(STRIPE_METER_FUZZ_CASES) STRIPE_METER_FUZZ_SEED=$(STRIPE_METER_FUZZ_SEED) $(prove_installcheck)

# The long variants of the "under fire" tests and their figures; the suite
# under AddressSanitizer (test/README.md).  Both run as scripts/test.sh does.
soak:
	bash scripts/soak.sh

check-asan:
	bash scripts/check-asan.sh

.PHONY: soak check-asan
