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
WL_SRCS   := $(wildcard tests/workloads/*.c)
WL_BINS   := $(patsubst tests/workloads/%.c,$(WL_OUT)/%,$(WL_SRCS))
KERNEL    ?= 7.2
QUICK     ?=
# In the guest (TCG, ~10x slower): the BPF suite and the end-to-end tests that use the
# kernel (real agents). Kernel-independent e2e tests (synthetic fleets, TLS, Prometheus)
# run on the host only.
VM_TESTS  ?= tests/bpf tests/e2e/test_fleet_real_agents.py
# The parked-threads test runs here again: its 7.2 shortfall (passed 1,476 of 1,500, 319
# lost) was the kernel skipping entry and exit programs under load (recursion_misses), not
# the reaper; the agent now counts those as missed. Host only, for CI time: the rename
# storms: they passed in the guest once the fentry hook's closes at exit of
# inherited files (/dev/null, pytest's O_TMPFILE "#5") were judged right (an unlinked
# file's name ends in " (deleted)"), but the storms with their negative controls took most
# of a 36-minute guest run under load, and the fentry negative control's storm processes
# outlived communicate(timeout=120) there. All of test_hardening.py and the perf ring
# overflow (lost records from the event's own count, not the late notice) run in the guest.
# The stage took 2,627 s of the runner's default 2,700 s in an unloaded full run (stop 15),
# and passed 3,300 s in a CI run (stop 25's, killed at its 98th percent): 60 minutes
# keep the whole of `make test` under CI's 90 (build ~4, host ~17, 6.12 ~5).
# Host only too, for time, suites whose subject is user space over unchanged programs:
# the BPF run-time statistics flag (a sysctl the agent toggles; ~4 minutes in the guest),
# the OTLP exporter across a receiver restart (~2 minutes), the compiled ring consumer
# against the Python one (~8 minutes; its hand-over of lost arguments to the user-space
# fallback stays: that needs the 7.2 rungs) and the compiled jsonl formatter's byte-for-byte
# comparisons (the formatter still runs under every `capture -o jsonl` there). The stage
# reached only 115 of its tests in 3,600 s in a loaded run here with the executable in
# events (its programs load ~18% slower).
VM_ARGS   ?= --memory 3G --timeout 3600 -- \
             -k 'not rename_storm and not bpf_run_time_stats and not test_export_otlp \
                 and not (test_fastring and not lost_args) and not test_jsonl_compiled'

# The 6.12 guest (user_events built in): its own short stage, user_events + cold openat.
VM612_TESTS ?= tests/bpf/test_user_events.py tests/bpf/test_capture_cold.py
VM612_K     ?= test_user_events or openat

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

$(NATIVE_SO): agent/native/fastring.c agent/native/jsonfmt.c agent/native/jsonfmt.h agent/native/rdbytes.h
	gcc -O2 -g -fPIC -shared -Wall -Wextra -Werror -o $@.tmp agent/native/fastring.c agent/native/jsonfmt.c -lbpf -lpthread && mv $@.tmp $@

native: $(NATIVE_SO) ## build the compiled ring consumer (agent/native) into the agent package

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
