# warren — the two commands users run are `make lab` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
RELEASE_DIR := target/release
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all deps build lab test lint bench bench-cni image clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace --bins

# The main job: build, bring up the three-node lab, run the seed's scenario, print what it saw.
lab: build
	@scripts/lab-demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every test: unit tests, privileged netns/iptables tests, the containerd test and the lab.
# Tests run as root; each makes uniquely named namespaces and removes them, even on failure.
test: build lint
	WARREN_BIN_DIR=$(CURDIR)/$(RELEASE_DIR) $(CARGO) test --release --workspace -- --test-threads=2
	WARREN_BIN_DIR=$(CURDIR)/$(RELEASE_DIR) scripts/check-install.sh

bench: build
	@scripts/bench.sh

bench-cni: build
	WARREN_BIN_DIR=$(CURDIR)/$(RELEASE_DIR) $(CARGO) run --release -p integration-tests --bin bench-cni

# The node image from deploy/Dockerfile (docker, podman or buildah); says so plainly and fails where none works.
image:
	@deploy/build-image.sh

clean:
	$(CARGO) clean
