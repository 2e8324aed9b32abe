# tracefleet: build, test and demo entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
BUILD     := build
BPF_OUT   := $(BUILD)/bpf
WL_OUT    := $(BUILD)/workloads
CLANG     ?= clang
BPFTOOL   ?= bpftool
ARCH      := $(shell uname -m | sed 's/x86_64/x86/;s/aarch64/arm64/')
# vmlinux.h is generated from the build host's BTF (not committed): CO-RE relocates every
# field access at load time, so objects built on 6.18 load on 7.2 and back.
VMLINUX_BTF ?= /sys/kernel/btf/vmlinux
BPF_SRCS  := $(wildcard bpf/*.bpf.c)
BPF_OBJS  := $(patsubst bpf/%.bpf.c,$(BPF_OUT)/%.bpf.o,$(BPF_SRCS))
BPF_HDRS  := $(wildcard bpf/include/*.h bpf/include/*/*.h)
# the compiled ring consumer, built into the agent package (package data; no compiler at run time)
NATIVE_SO := agent/src/tracefleet/agent/capture/libtfring.so
# the compiled decode (a CPython extension, the Python emitter of libtfring's record walker),
# built against the headers of the interpreter that runs the agent: the venv's, else python3
# (the agent image's build stage). Where it is missing the agent decodes in Python, and says so.
NATIVE_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
PY_INC    := $(shell $(NATIVE_PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null)
PY_EXT    := $(shell $(NATIVE_PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)
DECODE_SO := agent/src/tracefleet/agent/capture/_tfdecode$(PY_EXT)
WL_SRCS   := $(wildcard tests/workloads/*.c)
WL_BINS   := $(patsubst tests/workloads/%.c,$(WL_OUT)/%,$(WL_SRCS))
KERNEL    ?= 7.2
QUICK     ?=
# In the 7.2 guest (TCG, ~10x slower): the tests whose subject is what only 7.2 has, its
# rungs (sleepable tracepoints, fentry.s; fentry, refused on the host): cold capture per
# rung, the probe's report and the sleepable choice, enable bits and detach, each event set,
# the executable, the hand-over of lost arguments to the user-space fallback, follow,
# hostile arguments (rewritten paths and sockaddrs, parked threads, execve argv into a guard
# page), SIGKILL leaks and in-flight entries, VFS on its fentry hooks, and the file
# exporter's exactly-once test (the guest's slow file system found its uncounted losses at
# shutdown). On the host only: what runs the same code on every kernel (the ring-full drop
# counts, a flood in one set, the probe's table and lazy loading, the capture schema, VFS
# on tracepoints, the OTLP exporter, the record encoding, the compiled ring consumer against
# the Python one and the jsonl formatter's byte comparisons (the formatter still formats
# every `capture -o jsonl` here), the consumer's housekeeping and health, workload
# identity, host features the agent survives, real agents in a fleet) and the rename
# storms. Why: CI has 90 minutes for everything; the whole suite took ~4,300 s of the guest
# here and more than 3,600 s in stop 27's CI run; a wider selection than this one took
# 3,381 s of its 3,600 here (stop 28), this one ~2,200 s by the same run's test times.
VM_TESTS  ?= $(addprefix tests/bpf/,test_capture_cold.py test_agent_cli.py \
               test_enable_bits.py test_event_sets.py test_exe.py test_export_file.py \
               test_fastring.py test_follow.py test_hardening.py test_hardening_user.py \
               test_reliability_kernel.py test_user_events.py test_vfs.py \
               test_inflight_slots.py)
VM_ARGS   ?= --memory 3G --timeout 3600 -- \
             -k 'not rename_storm and not bpf_run_time_stats \
                 and not (test_fastring and not lost_args) \
                 and not (test_hardening_user and not guard_page) \
                 and not (test_export_file and not exactly_once) \
                 and not (test_vfs and tracepoint) and not stopped_consumer_drops \
                 and not flood_in_one_set \
                 and not (test_agent_cli and not (probe_reports or sleepable_is_chosen))'

# The 6.12 guest (user_events built in): its own short stage, user_events + cold openat,
# and swapped-out anonymous memory (zram is built in there; ~20 s of guest time).
VM612_TESTS ?= tests/bpf/test_user_events.py tests/bpf/test_capture_cold.py
VM612_K     ?= test_user_events or openat or swapped_out

# Goals that load BPF or install packages stop here, before anything runs (even under -j
# or -n), when not run as root: the script says why and how (sudo only where it exists).
ROOT_GOALS := test test-host test-vm demo bench
ifneq ($(filter $(ROOT_GOALS),$(MAKECMDGOALS)),)
ifneq ($(shell deploy/host/require-root.sh $(filter $(ROOT_GOALS),$(MAKECMDGOALS)) && echo ok),ok)
$(error not run as root (see above))
endif
endif

.PHONY: help deps bpf native workloads proto proto-check buf-lint buf-breaking lint \
        test test-unit test-host test-vm test-vm-uevents demo bench images dashboards clean

help: ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

deps: ## install Debian packages, .venv, buf, and mount tracefs/bpffs (idempotent)
	@deploy/host/install-deps.sh

$(BUILD)/vmlinux.h: | $(BUILD)
	$(BPFTOOL) btf dump file $(VMLINUX_BTF) format c > $@.tmp && mv $@.tmp $@

$(BUILD) $(BPF_OUT) $(WL_OUT):
	mkdir -p $@

$(BPF_OUT)/%.bpf.o: bpf/%.bpf.c $(BPF_HDRS) $(BUILD)/vmlinux.h | $(BPF_OUT)
	$(CLANG) -g -O2 -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Werror \
	  -I$(BUILD) -Ibpf/include -c $< -o $@

bpf: $(BPF_OBJS) ## build the CO-RE BPF objects into build/bpf

$(WL_OUT)/%: tests/workloads/%.c $(wildcard tests/workloads/*.h) | $(WL_OUT)
	gcc -O1 -g -fPIE -pie -Wall -Werror -o $@ $<

workloads: $(WL_BINS) native ## build the C test workloads into build/workloads (and native)

$(NATIVE_SO): agent/native/fastring.c agent/native/jsonfmt.c agent/native/jsonfmt.h agent/native/rdbytes.h agent/native/walk.h
	gcc -O2 -g -fPIC -shared -Wall -Wextra -Werror -o $@.tmp agent/native/fastring.c agent/native/jsonfmt.c -lbpf -lpthread && mv $@.tmp $@

$(DECODE_SO): agent/native/pydecode.c agent/native/walk.h agent/native/rdbytes.h
	@test -n "$(PY_INC)" && test -f "$(PY_INC)/Python.h" || { echo "no Python.h for $(NATIVE_PY) (python3-dev): the compiled decode is not built" >&2; exit 1; }
	gcc -O2 -g -fPIC -shared -Wall -Wextra -Werror -I$(PY_INC) -o $@.tmp agent/native/pydecode.c && mv $@.tmp $@

native: $(NATIVE_SO) $(DECODE_SO) ## build the compiled ring consumer and decode (agent/native) into the agent package

proto: ## regenerate the Python code of proto/ (commit the result)
	@proto/generate.sh

proto-check: ## fail if regenerating proto/ changes the tree
	@proto/generate.sh --check

buf-lint: ## buf lint (STANDARD) on proto/
	cd proto && ../$(BUILD)/tools/node_modules/.bin/buf lint

buf-breaking: ## buf breaking against main's proto/ (or BUF_AGAINST)
	@proto/breaking.sh

lint: ## ruff on all Python, mypy --strict on the model, the agent, the controller and the load generator
	$(VENV)/bin/ruff check agent controller proto tests
	$(VENV)/bin/ruff format --check agent controller tests proto/python/tracefleet/model
	$(VENV)/bin/mypy --strict -p tracefleet.model -p tracefleet.agent -p tracefleet.controller \
	  -m tests.loadgen

test-unit: ## unit tests only (no root needed)
	$(PY) -m pytest tests/unit -q

test-host: deps bpf workloads ## full suite on this kernel (root for BPF and e2e)
	$(PY) -m pytest tests -q -rs

test-vm: deps bpf workloads ## BPF and e2e suite inside a Linux $(KERNEL) guest under qemu
	$(PY) tests/vm/run.py --kernel $(KERNEL) -q --tests $(VM_TESTS) $(VM_ARGS)

test-vm-uevents: deps bpf workloads ## user_events and cold openat capture in the 6.12 guest
	$(PY) tests/vm/run.py --kernel 6.12 -q --tests $(VM612_TESTS) --memory 2G -- -k "$(VM612_K)"

test: deps lint proto-check buf-lint buf-breaking bpf workloads ## everything CI runs: lint, API checks, host suite, 7.2 and 6.12 suites
	$(PY) -m pytest tests -q -rs
	$(PY) tests/vm/run.py --kernel $(KERNEL) -q --tests $(VM_TESTS) $(VM_ARGS)
	$(PY) tests/vm/run.py --kernel 6.12 -q --tests $(VM612_TESTS) --memory 2G -- -k "$(VM612_K)"

demo: deps bpf workloads ## controller + local agent, live capture demo
	$(PY) deploy/host/demo.py

images: ## build the agent and controller images with buildah (base made with debootstrap)
	deploy/images/build-base.sh && deploy/images/build.sh

dashboards: ## regenerate deploy/grafana/*.json from deploy/grafana/generate.py
	$(PY) deploy/grafana/generate.py

bench: deps bpf workloads ## benchmark table vs untraced, bpftrace, strace (QUICK=1 for a smoke run)
	$(PY) tests/bench/run.py $(if $(QUICK),--quick)

clean: ## remove build outputs
	rm -rf $(BUILD)/bpf $(BUILD)/workloads $(BUILD)/vmlinux.h
