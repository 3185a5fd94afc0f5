# Every target is a one-line call; the logic lives in Rust (and scripts/ for machine setup).
DEV_API_KEY ?= dev-api-key-change-me-0123
SHELL := bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: test deps lint build run cluster bench bench-detail fmt chart fuzz

# The tests run the debug build; the release build (`make build`, the image's
# scripts/build-release) is left out of the test run to keep CI within its time budget.
test: deps lint
	cargo build --workspace --bins
	timeout 1500 cargo test --workspace 2>&1 | tee target/test-output.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "%d passed, %d failed\n", p, f }' target/test-output.log
	FUZZ_SECONDS=10 scripts/fuzz

deps:
	scripts/test-deps

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

build:
	scripts/build-release

run: build
	@sed -e 's/$$API_KEY/$(DEV_API_KEY)/g' docs/run-banner.txt
	FLEETGATE_API_KEY=$(DEV_API_KEY) ./target/release/fleetgate all

cluster: build
	scripts/cluster

bench:
	cargo build --release -p fleetgate -p fleetgate-loadtest
	cargo bench -p fleetgate-e2e --bench loadtest

bench-detail:
	cargo build --release -p fleetgate
	cargo bench -p fleetgate-e2e --bench gateway
	cargo bench -p fleetgate-e2e --bench cluster
	cargo bench -p fleetgate-e2e --bench admin

fmt:
	cargo fmt --all

# Every fuzz target for FUZZ_SECONDS (20) each; `scripts/fuzz 600 json_frame` for a long run.
fuzz:
	scripts/fuzz

# Regenerates k8s/base (and the chart's copy of nginx/'s config) after a chart change.
chart:
	scripts/chart.py generate
