# fedmcp build and test entry points.
#
#   make run        build, print an operator admin token, start the proxy on 127.0.0.1:8443
#   make test       cargo test, then the interop suite, then the smoke targets
#   make interop    Python clients (websockets, PyJWT, curl, the official MCP SDK 2.x and 1.x)
#                   against the real binary
#   make lint       rustfmt check and clippy with warnings as errors
#   make bench      the load generator and memory bench (figures: docs/PERFORMANCE.md)
#   make static     a fully static x86_64 musl release binary (installs the target and musl-tools)
#   make image      a container image FROM scratch around the static binary: an OCI image layout
#                   tarball, target/fedmcp-image.oci.tar (deploy/make-image.sh; no daemon, no registry)
#   make deploy-check  the deployable artifacts of deploy/ (systemd unit, env file, image) checked
#                   with the dev binary, in seconds (deploy/test.sh; IMAGE_BIN=path builds the test
#                   image around that binary instead, e.g. the static one)
#   make fuzz       every fuzz target for FUZZ_SECONDS (default 300); make test runs 10 s each
#   make sim        a million seeds of the deterministic simulation (make test runs 4000)
#   make chaos-cluster  CHAOS_CLUSTER_CYCLES (default 30) cycles of kill -9 of a proxy or of one
#                   NATS node under queued traffic on a 3-proxy, 3-node JetStream cluster; no
#                   acknowledged message may be lost (release build; CHAOS_SEED=n replays a run)
#   make clean      remove .venv, .venv-mcp1 and fedmcp-data (make clean-all also removes target/)
#
# Needs only Rust, Python 3.11 and network access to crates.io and PyPI.
# FEDMCP_BIN=/path/to/fedmcp make interop  tests that binary instead of building one.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
# Targets run one after another: `make test` must run its steps in order even under -j.
.NOTPARALLEL:

CARGO ?= cargo
PYTHON ?= python3
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
DEV_BIN := $(TARGET_DIR)/debug/fedmcp

VENV := .venv
VENV_PY := $(VENV)/bin/python
INTEROP_REQS := tests/interop/requirements.txt
INTEROP_STAMP := $(VENV)/.interop-requirements
# A second venv for the MCP SDK 1.x (its websocket_client and streamablehttp_client): it
# cannot share .venv with the SDK 2.x. The interop suite runs its script with this python.
VENV_MCP1 := .venv-mcp1
VENV_MCP1_PY := $(VENV_MCP1)/bin/python
MCP1_REQS := tests/interop/requirements-mcp1.txt
MCP1_STAMP := $(VENV_MCP1)/.interop-requirements
# Extra arguments for the interop runner, e.g. INTEROP_ARGS="-v -k queue".
INTEROP_ARGS ?=
# Upper bound for the whole interop run, in seconds (each wait inside is bounded too).
INTEROP_TIMEOUT ?= 900

# `make run` settings: the embedded defaults.
RUN_LISTEN ?= 127.0.0.1:8443
RUN_STATE_DIR ?= ./fedmcp-data

.PHONY: all build run test cargo-test test-tools interop test-smoke lint fuzz fuzz-smoke cargo-fuzz soak bench bench-smoke static image deploy-check clean clean-all chaos chaos-cluster sim

all: build

build:
	$(CARGO) build --bin fedmcp

# The admin token is printed here, by make, before the proxy starts: it never passes
# through the proxy's log. `fedmcp token` creates the secret in the state dir if missing,
# and the proxy then keeps using it.
run: build
	@tok=$$(FEDMCP_STATE_DIR='$(RUN_STATE_DIR)' '$(DEV_BIN)' token --server-id operator --admin); \
	echo "Operator admin token (serverId \"operator\", type admin; send it as \"Authorization: Bearer <token>\" to the admin API, e.g. GET /v1/servers):"; \
	echo "$$tok"; \
	echo ""; \
	FEDMCP_LISTEN='$(RUN_LISTEN)' FEDMCP_STATE_DIR='$(RUN_STATE_DIR)' exec '$(DEV_BIN)'

test: cargo-test interop test-smoke

cargo-test: test-tools
	$(CARGO) test --no-fail-fast

# Command-line tools the tests run: curl (tests/tls_startup.rs and the interop suite),
# openssl (the TLS interop checks make certificates with it) and nats-server (the cluster
# tests run real NATS servers, docs/PROTOCOL.md §10; Debian's package puts it in /usr/sbin). A
# missing one is installed from Debian's packages; the tests fail, never skip, without them.
TEST_TOOLS := curl openssl nats-server

test-tools:
	@missing=""; for t in $(TEST_TOOLS); do PATH="$$PATH:/usr/sbin" command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "test-tools: installing$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq $$missing; fi; \
	fi

# ---- smoke tests: other engineers add their targets here --------------------------------
# Add each smoke target as a prerequisite of test-smoke (and so of `make test`).
test-smoke: fuzz-smoke bench-smoke deploy-check
	@true
# ------------------------------------------------------------------------------------------

$(INTEROP_STAMP): $(INTEROP_REQS)
	@if [ ! -x '$(VENV_PY)' ]; then echo "creating $(VENV)"; $(PYTHON) -m venv '$(VENV)'; fi
	'$(VENV_PY)' -m pip install --disable-pip-version-check --quiet -r '$(INTEROP_REQS)'
	@touch '$@'

$(MCP1_STAMP): $(MCP1_REQS)
	@if [ ! -x '$(VENV_MCP1_PY)' ]; then echo "creating $(VENV_MCP1)"; $(PYTHON) -m venv '$(VENV_MCP1)'; fi
	'$(VENV_MCP1_PY)' -m pip install --disable-pip-version-check --quiet -r '$(MCP1_REQS)'
	@touch '$@'

interop: $(INTEROP_STAMP) $(MCP1_STAMP) test-tools
	@bin='$(FEDMCP_BIN)'; \
	if [ -z "$$bin" ]; then \
	  $(CARGO) build --bin fedmcp; \
	  bin='$(DEV_BIN)'; \
	fi; \
	echo "interop: testing $$bin"; \
	FEDMCP_BIN="$$bin" FEDMCP_MCP1_PYTHON='$(abspath $(VENV_MCP1_PY))' timeout --foreground -k 10 '$(INTEROP_TIMEOUT)' '$(VENV_PY)' tests/interop/run.py $(INTEROP_ARGS)

# The proxy's crate and the fuzz crate (fuzz/, its own workspace) alike.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	cd fuzz && $(CARGO) fmt --all -- --check
	cd fuzz && $(CARGO) clippy --all-targets -- -D warnings

# ---- fuzzing (cargo-fuzz, libFuzzer, nightly toolchain) ------------------------------------
# Seeds are checked in under fuzz/corpus/<target>; what the fuzzer finds goes to a scratch
# corpus under fuzz/target, so a run never dirties the work tree. Crashes land in
# fuzz/artifacts/<target>/.
FUZZ_TARGETS := jwt_verify http_head chunked jsonrpc state_log config session outbound_answer access ws_frames mcp nats
FUZZ_SECONDS ?= 300
FUZZ_SMOKE_SECONDS ?= 10
FUZZ_TOOLCHAIN ?= +nightly

# cargo-fuzz: the one on PATH, else installed inside the repository (.tools/, ignored by git),
# never into the user's global cargo bin.
TOOLS_DIR := $(abspath .tools)
export PATH := $(TOOLS_DIR)/bin:$(PATH)

cargo-fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install --root '$(TOOLS_DIR)' cargo-fuzz --locked

define run-fuzz
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/corpus/$$t; \
	  echo "fuzz: $$t for $(1) s"; \
	  $(CARGO) $(FUZZ_TOOLCHAIN) fuzz run -O $$t target/corpus/$$t corpus/$$t -- \
	    -max_total_time=$(1) -max_len=16384 -print_final_stats=1 2>&1 \
	    | grep -E '^(Done|stat::number_of_executed_units|INFO: seed corpus)|ERROR|panicked|SUMMARY' ; \
	  test $${PIPESTATUS[0]} -eq 0 || { echo "fuzz: $$t FAILED"; exit 1; }; \
	done
endef

fuzz: cargo-fuzz
	$(call run-fuzz,$(FUZZ_SECONDS))

fuzz-smoke: cargo-fuzz
	$(call run-fuzz,$(FUZZ_SMOKE_SECONDS))

# Crash chaos: 50 cycles of "queue sends, kill -9 at a random moment" on one state dir, then
# a drain that must find every message answered `queued` (tests/chaos.rs).
chaos:
	CHAOS_CYCLES=50 $(CARGO) test --release --test chaos -- --nocapture

# Cluster crash chaos (docs/PROTOCOL.md §10, tests/chaos_cluster.rs): three proxies on a three-node
# JetStream NATS cluster with 3 replicas; a sender queues numbered messages for an offline
# recipient while, at random moments, a proxy or one NATS node (never two at once) is killed
# with kill -9 and restarted. The recipient then drains: every message answered `queued` must
# come out (duplicates are allowed and printed). Prints `chaos-cluster: cycles=... acknowledged=...
# delivered=... lost=... duplicated=... seed=...`; CHAOS_SEED=<seed> replays a run's choices.
CHAOS_CLUSTER_CYCLES ?= 30
chaos-cluster:
	CHAOS_CLUSTER_CYCLES=$(CHAOS_CLUSTER_CYCLES) $(CARGO) test --release --test chaos_cluster -- --nocapture

# Deterministic simulation (tests/sim.rs, src/sim.rs): `make test` plays the default seeds
# (SIM_SEEDS=4000, under a minute); this plays a million in a release build. A failing seed
# prints the one-line command that replays it with a trace.
SIM_SEEDS_LONG ?= 1000000
sim:
	SIM_SEEDS=$(SIM_SEEDS_LONG) $(CARGO) test --release --test sim seeds -- --nocapture

# Placeholders: the engineers who own these replace the recipe.

# Resources soak: a 1 GiB upload and download through a release build, with the proxy's
# peak RSS (VmHWM) under 32 MiB and a control session answering within 1 s (tests/resources.rs).
soak:
	FEDMCP_SOAK_BYTES=1073741824 $(CARGO) test --release --test resources -- --ignored --nocapture soak

# ---- benchmarks (release build with LTO; figures and method in docs/PERFORMANCE.md) --------
# The load generator drives two members through the proxy (confirmed forwards/s, latency,
# CPU of both sides); the memory bench measures idle RSS and RSS per idle session. Each
# fails (exit 1) under its floor, so the smoke run in `make test` catches a collapse.
# The same load generator also drives nats-server (--mode nats; test-tools installs it) and a
# raw TCP relay (--mode relay, the floor), closed loop and open loop (--open-loop RATE: a
# fixed schedule, latency from each request's scheduled time; --runs 3: min/median/max).
# Costs that grow: the same 4 pairs (the proxy is the bottleneck, so a per-message cost
# shows) with nothing else, with 10,000 more idle online sessions, with 10,000 messages queued
# for an offline server, and with 10,000 queued for the recipient and drained first, back to
# back (the idle sessions need ~10,100 file descriptors). Disk stalls: the proxy with a state
# dir in BENCH_STATE_DIR (on a disk, not tmpfs), 10,000 forwards/s open loop, while nothing
# (baseline), a 1 GiB upload or a state-log compaction runs, interleaved, three times each.
BENCH_STATE_DIR ?= $(TARGET_DIR)

bench: test-tools
	$(CARGO) bench --bench loadgen -- --min-rate 50000 --label pairs1
	$(CARGO) bench --bench loadgen -- --pairs 4 --min-rate 50000 --label pairs4
	$(CARGO) bench --bench loadgen -- --mode nats --min-rate 50000 --label nats-pairs1
	$(CARGO) bench --bench loadgen -- --mode relay --min-rate 50000 --label relay-pairs1
	$(CARGO) bench --bench loadgen -- --open-loop 10000 --runs 3 --min-rate 9000 --label open10k
	$(CARGO) bench --bench loadgen -- --mode nats --open-loop 10000 --runs 3 --min-rate 9000 --label nats-open10k
	$(CARGO) bench --bench loadgen -- --mode relay --open-loop 10000 --runs 3 --min-rate 9000 --label relay-open10k
	$(CARGO) bench --bench loadgen -- --pairs 4 --runs 3 --min-rate 50000 --label growth-empty
	ulimit -n 16384 || true; $(CARGO) bench --bench loadgen -- --pairs 4 --runs 3 --idle-sessions 10000 --min-rate 50000 --label growth-idle10k
	$(CARGO) bench --bench loadgen -- --pairs 4 --runs 3 --queued 10000 --min-rate 50000 --label growth-queued10k
	$(CARGO) bench --bench loadgen -- --pairs 4 --runs 3 --recipient-queued 10000 --min-rate 50000 --label growth-rqueued10k
	mkdir -p '$(BENCH_STATE_DIR)'; $(CARGO) bench --bench loadgen -- --state-dir '$(BENCH_STATE_DIR)' --open-loop 10000 --duration 15 --runs 3 --background none,upload:1073741824,compaction --min-rate 9000 --label disk
	ulimit -n 16384 || true; $(CARGO) bench --bench memory -- --sessions 10000 --max-bytes-per-session 1024 --max-idle-kib 10240
	ulimit -n 4096 || true; $(CARGO) bench --bench memory -- --max-idle-kib 4608
	$(CARGO) bench --bench hostile -- --unauth-max-growth-kib 16384 --flood-max-growth-kib 78976
	$(CARGO) bench --bench mcp
	$(CARGO) bench --bench cluster -- --duration 10 --min-rate 10000

bench-smoke: test-tools
	$(CARGO) bench --bench loadgen -- --duration 2 --warmup 0.5 --min-rate 5000 --label smoke
	$(CARGO) bench --bench loadgen -- --mode nats --duration 1 --warmup 0.5 --min-rate 5000 --label smoke-nats
	$(CARGO) bench --bench loadgen -- --mode relay --duration 1 --warmup 0.5 --min-rate 5000 --label smoke-relay
	$(CARGO) bench --bench loadgen -- --open-loop 2000 --duration 1 --warmup 0.5 --min-rate 1500 --label smoke-open
	$(CARGO) bench --bench loadgen -- --duration 1 --warmup 0.5 --idle-sessions 100 --queued 100 --recipient-queued 100 --min-rate 5000 --label smoke-growth
	mkdir -p '$(BENCH_STATE_DIR)'; $(CARGO) bench --bench loadgen -- --state-dir '$(BENCH_STATE_DIR)' --open-loop 2000 --duration 1.5 --warmup 0.5 --background none,upload:33554432,compaction --min-rate 1500 --label smoke-disk
	ulimit -n 4096 || true; $(CARGO) bench --bench memory -- --sessions 100 --settle 0.2 --max-bytes-per-session 32768 --max-idle-kib 8192 --label smoke
	$(CARGO) bench --bench hostile -- --sockets 100 --window-secs 0.5 --sends 160 --settle 0.2 --unauth-max-growth-kib 16384 --flood-max-growth-kib 81920
	$(CARGO) bench --bench mcp -- --calls 300 --label smoke
	$(CARGO) bench --bench cluster -- --duration 2 --warmup 0.5 --min-rate 2000 --label smoke

# ---- static binary (x86_64 musl) ---------------------------------------------------------
# ring compiles a little C: for musl it needs musl-gcc (Debian's musl-tools).
# Linked with the toolchain's own lld: identical code folding (--icf=all) and packed
# relative relocations (RELR, which the toolchain's self-contained musl start-up applies)
# keep the static-pie binary under its 3 MiB budget (STATIC_MAX_BYTES; docs/PERFORMANCE.md)
# with no change to what it runs. Cold crates are built for size in Cargo.toml.
STATIC_TARGET := x86_64-unknown-linux-musl
STATIC_BIN := $(TARGET_DIR)/$(STATIC_TARGET)/release/fedmcp
STATIC_MAX_BYTES := 3145728
GCC_LD = $(shell rustc --print sysroot)/lib/rustlib/$(shell rustc -vV | sed -n 's/^host: //p')/bin/gcc-ld
STATIC_RUSTFLAGS = -C link-arg=-fuse-ld=lld -C link-arg=-B$(GCC_LD) -C link-arg=-Wl,--icf=all -C link-arg=-Wl,--pack-dyn-relocs=relr

static:
	@rustup target list --installed 2>/dev/null | grep -qx '$(STATIC_TARGET)' || rustup target add '$(STATIC_TARGET)'
	@command -v musl-gcc >/dev/null 2>&1 || { \
	  echo "static: installing musl-tools (musl-gcc) for ring's C parts"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq musl-tools; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq musl-tools; fi; }
	CC_x86_64_unknown_linux_musl=musl-gcc CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS='$(STATIC_RUSTFLAGS)' \
	  $(CARGO) build --release --target '$(STATIC_TARGET)' --bin fedmcp
	@file '$(STATIC_BIN)' 2>/dev/null || true
	@'$(STATIC_BIN)' --version
	@size=$$(stat -c %s '$(STATIC_BIN)'); \
	  echo "static: $(STATIC_BIN): $$size bytes (budget $(STATIC_MAX_BYTES))"; \
	  [ "$$size" -le $(STATIC_MAX_BYTES) ] || { echo "static: over the size budget" >&2; exit 1; }

# ---- deployable artifacts (deploy/; deploy/README.md says how to install them) -------------
# image: the static binary at /fedmcp in one layer FROM scratch, written as an OCI image layout
# in a tar file (`skopeo copy oci-archive:$(IMAGE_OUT):<tag> ...` pushes or loads it).
# IMAGE_TAG (default: the version in Cargo.toml) names it in index.json.
IMAGE_OUT ?= $(TARGET_DIR)/fedmcp-image.oci.tar
IMAGE_TAG ?=

image: static
	PYTHON='$(PYTHON)' deploy/make-image.sh --bin '$(STATIC_BIN)' --out '$(IMAGE_OUT)' $(if $(IMAGE_TAG),--tag '$(IMAGE_TAG)')

# deploy-check: systemd-analyze verify and security of deploy/fedmcp.service, the env file
# against docs/CONFIGURATION.md and the unit, the proxy run with the env file under strace
# against the unit's sandbox, and an image built around the binary (layout, digests, umoci
# unpack, a run as the image's user). Installs the Debian tools it uses when missing (systemd,
# strace, umoci, oci-image-tool, openssl, curl).
# FEDMCP_BIN=/path checks that binary instead of building the dev one; IMAGE_BIN=/path builds
# the test image around another binary (a static one also runs in a chroot of the image).
deploy-check:
	@bin='$(FEDMCP_BIN)'; \
	if [ -z "$$bin" ]; then \
	  $(CARGO) build --bin fedmcp; \
	  bin='$(DEV_BIN)'; \
	fi; \
	IMAGE_BIN='$(IMAGE_BIN)' PYTHON='$(PYTHON)' deploy/test.sh "$$bin"

clean:
	rm -rf '$(VENV)' '$(VENV_MCP1)' fedmcp-data tests/interop/__pycache__

clean-all: clean
	$(CARGO) clean
