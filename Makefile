# Every entry point of Ballast. `make test` is the one test command (CI runs it).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# Builds and downloads are cached outside the clone, shared by every checkout.
export BALLAST_CACHE ?= $(HOME)/.cache/ballast
export CARGO_TARGET_DIR ?= $(BALLAST_CACHE)/target
STACK := e2e/stack/stack.sh
# Exports the stack's endpoints (KUBECONFIG, BALLAST_*) into a recipe's shell.
WITH_STACK = set -a; source "$$($(STACK) env)"; set +a;

.PHONY: demo test bench stack-up stack-down stack-status build image lint fmt crds

## demo: the main job: the whole platform on the local stack, failing and recovering, in one terminal
demo:
	@if $(STACK) status >/dev/null 2>&1; then was_up=1; else was_up=; fi; \
	$(STACK) up; \
	cargo build --locked -p ballast-operator -p ballast-worker -p ballast-demo; \
	code=0; $(WITH_STACK) "$(CARGO_TARGET_DIR)/debug/ballast-demo" || code=$$?; \
	if [ -z "$$was_up" ]; then $(STACK) down; fi; \
	exit $$code

## test: start the local stack if needed, then run all unit and integration tests
test: stack-up
	@# Namespaces left by earlier runs would give every operator under test old pipelines to reconcile.
	@# Their MemberStores' finalizer waits for an operator that no longer runs: it is lifted first.
	@# Their pods are bound to the stand-in kubelets' Node, which no kubelet serves between runs:
	@# nothing would confirm their deletion and the namespaces would stay Terminating, so they are
	@# force-deleted (no test runs yet; the real node's pods are on another Node).
	$(WITH_STACK) kubectl="$(BALLAST_CACHE)/bin/kubectl"; \
	  { "$$kubectl" get memberstores -A -o jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name}{"\n"}{end}' 2>/dev/null || true; } | \
	  while read -r ns name; do \
	    "$$kubectl" -n "$$ns" patch memberstore "$$name" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null; \
	  done; \
	  "$$kubectl" delete namespace -l ballast.dev/fixture --wait=false >/dev/null; \
	  "$$kubectl" delete pods -A --field-selector spec.nodeName=ballast-e2e --force --grace-period=0 \
	    --wait=false >/dev/null 2>&1 || true
	@# Their Elasticsearch indices too: a node holds 1,000 shards at most.
	$(STACK) clean
	$(WITH_STACK) cargo test --workspace --locked

## bench: operator detection and memory; ingestion, compute and dispatch throughput; master failover; query answers; the history engine against DataFusion; nightly rollups and the precomputed hit rate; member lookups and writes; member promotion and failback replay; flow-control decisions; membership API load (each beside a baseline)
bench: stack-up
	$(WITH_STACK) cargo bench --locked -p ballast-operator -p ballast-worker -p ballast-flow -p ballast-node --bench detection --bench ingest --bench compute --bench master --bench query --bench history --bench nightly --bench members --bench promotion --bench decisions --bench membership

## stack-up: install what is missing and start the local stack (idempotent)
stack-up:
	$(STACK) up

## stack-down: stop what stack-up started
stack-down:
	$(STACK) down

## stack-status: one health line per server
stack-status:
	$(STACK) status

## crds: regenerate the CRD YAML in crds/ and the Helm chart from the Rust types (a test fails on drift)
crds:
	cargo run --quiet --locked -p ballast-crds --bin crdgen -- crds charts/ballast/crds

## build: compile every crate
build:
	cargo build --workspace --locked

## image: the operator and worker container images, from scratch and without a Docker daemon, as OCI archives in ~/.cache/ballast/images/ (image/build.sh; image/Containerfile builds the same with Docker or Podman)
image:
	cargo build --release --locked -p ballast-operator -p ballast-worker --bins
	image/build.sh

## lint: formatting and clippy, warnings are errors
lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

fmt:
	cargo fmt --all
