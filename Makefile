# chbridge: `make demo` and `make test` do everything on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export CH_HTTP_PORT ?= 8123
export CH_TCP_PORT ?= 9000
export KAFKA_PORT ?= 9092
export KAFKA_CONTROLLER_PORT ?= 9093
export TANSU_PORT ?= 9094
export CH_HTTPS_PORT ?= 8443
export KAFKA_SASL_SSL_PORT ?= 9095
export KAFKA_SASL_PLAIN_PORT ?= 9096
export KAFKA_SSL_PORT ?= 9097

.PHONY: help demo demo-stop test unit it it-https it-tansu chaos chaos-short bench bench-micro fuzz lint lint-deploy image fmt build release stack-up stack-down stack-status

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

demo: ## install and start the stack, run chbridge on sample events, show the rows
	scripts/demo.sh

demo-stop: ## stop the demo bridge and the local stack
	scripts/demo.sh stop
	scripts/stack.sh stop

test: stack-up lint-deploy ## the whole suite: deployment lint, unit, integration on Apache Kafka, an HTTPS subset, the tansu subset, short fault injection
	cargo test --all-targets
	$(MAKE) it-https
	$(MAKE) it-tansu
	$(MAKE) chaos-short

# The same bridges over HTTPS with a client certificate (the stack's own CA,
# scripts/stack.sh): end to end, exactly-once, ClickHouse outages.
HTTPS_SUBSET := end_to_end:: exactly_once:: clickhouse_outage::
it-https: stack-up ## the end-to-end, exactly-once and outage tests with chbridge talking HTTPS to ClickHouse
	CHBRIDGE_IT_HTTPS=1 cargo test --test it -- $(HTTPS_SUBSET)

# The compatibility subset on a second Kafka-protocol broker: end to end,
# restarts, rebalances and exactly-once (docs/compatibility.md).
TANSU_SUBSET := end_to_end:: restarts:: exactly_once::
it-tansu: ## the compatibility subset of the integration tests on tansu
	scripts/stack.sh start clickhouse
	scripts/stack.sh start tansu
	KAFKA_PORT=$(TANSU_PORT) cargo test --test it -- $(TANSU_SUBSET)
	scripts/stack.sh stop tansu

unit: ## unit tests only (no servers needed)
	cargo test --lib --bins

it: stack-up ## integration tests only
	scripts/deploy_tools.sh install
	cargo test --test it

# The chaos runs start their own private ClickHouse and broker on free ports:
# only the packages of the stack are needed, not the shared servers.
chaos: release ## fault injection against the real stack, both delivery modes
	scripts/stack.sh install
	.venv/bin/python scripts/chaos.py --bin target/release/chbridge

chaos-short: build ## a few faults only, both delivery modes, a few minutes
	scripts/stack.sh install
	.venv/bin/python scripts/chaos.py --short --bin target/debug/chbridge

# The benchmark starts its own private ClickHouse and broker on free ports,
# like the chaos runs. About 15 minutes; figures in target/bench/results.json.
bench: ## chbridge vs the Kafka engine vs a naive consumer vs the ceilings, then micro-benchmarks (docs/performance.md)
	scripts/stack.sh install
	cargo build --release --bins --examples
	.venv/bin/python scripts/bench.py --bin-dir target/release
	$(MAKE) bench-micro

bench-micro: ## criterion micro-benchmarks of the hot path (records per second per core)
	cargo bench --bench hot_path -- --warm-up-time 1 --measurement-time 5

# libFuzzer on every record decoder (fuzz/fuzz_targets/decoders.rs). Needs a
# nightly toolchain; installs cargo-fuzz. Without ASan (-s none): cc-built C
# dependencies would be instrumented but librdkafka's configure cannot link them.
FUZZ_SECONDS ?= 300
fuzz: ## fuzz every record decoder for FUZZ_SECONDS (default 300; nightly toolchain)
	scripts/stack.sh install
	rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
	.venv/bin/python fuzz/seeds.py fuzz/corpus/decoders
	cargo +nightly fuzz run -s none decoders fuzz/corpus/decoders -- \
		-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1

lint-deploy: ## Dockerfile, Compose, Kubernetes overlays, Prometheus rules, Grafana dashboard: offline checks
	scripts/lint_deploy.sh

image: ## build the container image (needs a Docker engine)
	docker build -t chbridge:$$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1) -t chbridge:latest .

lint: ## formatting, clippy (warnings are errors), and ARCHITECTURE.md naming only code that exists
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	python3 scripts/check_architecture.py

fmt:
	cargo fmt --all

build:
	cargo build

release:
	cargo build --release

stack-up: ## install (pinned, into .venv) and start ClickHouse and the broker on 127.0.0.1
	scripts/stack.sh start

stack-down: ## stop what stack-up started
	scripts/stack.sh stop

stack-status:
	scripts/stack.sh status
