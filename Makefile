# Every entry point of Ballast. `make test` is the one test command (CI runs it).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# Builds and downloads are cached outside the clone, shared by every checkout.
export BALLAST_CACHE ?= $(HOME)/.cache/ballast
export CARGO_TARGET_DIR ?= $(BALLAST_CACHE)/target
STACK := e2e/stack/stack.sh
# Exports the stack's endpoints (KUBECONFIG, BALLAST_*) into a recipe's shell.
WITH_STACK = set -a; source "$$($(STACK) env)"; set +a;

.PHONY: test bench stack-up stack-down stack-status build lint fmt crds

## test: start the local stack if needed, then run all unit and integration tests
test: stack-up
	$(WITH_STACK) cargo test --workspace --locked

## bench: operator detection and memory; ingestion throughput (each beside a raw baseline)
bench: stack-up
	$(WITH_STACK) cargo bench --locked -p ballast-operator -p ballast-worker --bench detection --bench ingest

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

## lint: formatting and clippy, warnings are errors
lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

fmt:
	cargo fmt --all
