# Makefile for the billing extension (PGXS).
#
#   make / make install   build and install the extension
#   make test             install what is missing, build with -Werror, run every suite
#                         on a throwaway cluster, print "N passed, N failed"
#   make demo             build, install and run the demo scenario on a throwaway cluster
#   make bench            benchmarks against their peers (not tests)
#   make check-valgrind   the core paths in one backend under valgrind memcheck
#   make check-upgrade    build, install and run the schema check of the upgrade
#                         (1.0 + ALTER EXTENSION UPDATE against a fresh install)
#   make dist             billing-<version>.zip for PGXN: git archive of HEAD
#                         (prefix billing-<version>/) plus the assembled script

EXTENSION  = billing
EXTVERSION = $(shell sed -n "s/^default_version[[:space:]]*=[[:space:]]*'\([^']*\)'.*/\1/p" billing.control)

MODULE_big = billing
OBJS       = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))

# The install script of the current version is assembled from the ordered
# parts under sql/install/ (one part per concern).  Released install scripts
# (sql/billing--1.0.sql) are committed and never edited again; every change
# after a release also goes into the hand-written upgrade script
# (sql/billing--1.0--1.1.sql), and the upgrade test checks that an upgraded
# 1.0 equals a fresh install.
EXTSQL     = sql/$(EXTENSION)--$(EXTVERSION).sql
DATA       = $(EXTSQL) $(filter-out $(EXTSQL),$(wildcard sql/$(EXTENSION)--*.sql))
DOCS       = doc/billing.md
EXTRA_CLEAN = $(EXTSQL) results regression.diffs regression.out $(DISTNAME).zip .dist README.md.out doc/billing.md.out

TESTS      = $(filter-out setup,$(sort $(basename $(notdir $(filter-out sql/$(EXTENSION)--%,$(wildcard sql/*.sql))))))
REGRESS    = setup $(TESTS)
REGRESS_OPTS = --load-extension=plpgsql

PG_CONFIG ?= pg_config
# the audit log hashes with OpenSSL directly when PostgreSQL is built with it
SHLIB_LINK += $(if $(findstring with-openssl,$(shell $(PG_CONFIG) --configure)),-lcrypto)
PG_CFLAGS += -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
ifdef WERROR
PG_CFLAGS += -Werror
endif

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

all: $(EXTSQL)

$(EXTSQL): $(sort $(wildcard sql/install/*.sql)) billing.control
	@echo 'assembling $@'
	@{ printf '%s\n' '-- $@: assembled by make from the parts in sql/install; edit those.'; \
	   printf '%s\n' '\echo Use "CREATE EXTENSION $(EXTENSION)" to load this file. \quit'; \
	   for f in $(sort $(wildcard sql/install/*.sql)); do echo; echo "-- ---- $$f ----"; cat $$f; done; } > $@

# The PGXN distribution: the version is META.json's (test/dist/run.sh checks
# it is billing.control's default_version as major.minor.0).  The archive is
# the last commit (git archive HEAD), plus the install script of the current
# version assembled from HEAD's sql/install parts (it is not in git).
DISTVERSION = $(shell perl -MJSON::PP -e 'local $$/; open my $$f, "<", "META.json" or die; print JSON::PP->new->decode(<$$f>)->{version}')
DISTNAME   = $(EXTENSION)-$(DISTVERSION)

.PHONY: dist
dist:
	rm -rf .dist $(DISTNAME).zip && mkdir .dist
	git archive HEAD | tar -x -C .dist
	$(MAKE) -s -C .dist $(EXTSQL) PG_CONFIG=$(PG_CONFIG)
	git archive --format=zip --prefix=$(DISTNAME)/sql/ --add-file=.dist/$(EXTSQL) \
	    --prefix=$(DISTNAME)/ -o $(DISTNAME).zip HEAD
	rm -rf .dist
	@echo "$(DISTNAME).zip"

.PHONY: test demo bench bench-citus check-valgrind check-upgrade
test:
	bash test/run_tests.sh

check-upgrade:
	bash -c '. test/lib.sh && build_install' && bash test/upgrade/run.sh --schema

check-valgrind:
	bash test/valgrind/run.sh

demo:
	bash test/demo.sh

bench:
	bash test/bench/run.sh

bench-citus:
	bash test/bench/citus.sh

# every object depends on every header (PGXS tracks no header dependencies)
$(OBJS): $(wildcard src/*.h)
