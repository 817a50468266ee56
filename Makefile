# apm-csi — run `make help` for the targets.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GOARCH  ?= $(shell go env GOARCH)
LDFLAGS := -s -w -X github.com/apm-csi/apm-csi/shared/version.Version=$(VERSION)
BIN     := bin

# Fuzz targets run briefly by `make fuzz` (and so by CI): <package dir>:<FuzzName>.
FUZZ_TARGETS := shared/volumeattrs:FuzzParse
FUZZ_TIME    ?= 15s

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
		/^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2 } \
		/^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Build

.PHONY: build
build: ## Build apm-csi-node and apm-csi-webhook into ./bin (static).
	@mkdir -p $(BIN)
	CGO_ENABLED=0 go build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./nodeplugin/cmd/apm-csi-node $(wildcard ./webhook/cmd/apm-csi-webhook)

##@ Test

.PHONY: test
test: deps lint test-unit fuzz test-integration ## Everything CI runs: deps, lint, unit, fuzz, root integration, sanity, envtest, deploy, e2e.

.PHONY: deps
deps: ## Install Debian packages and build/cache the Kubernetes binaries the tests need.
	@hack/install-deps.sh >/dev/null

.PHONY: lint
lint: ## gofmt and go vet.
	@out="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"; \
		if [[ -n "$$out" ]]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
	go vet ./...

.PHONY: test-unit
test-unit: ## Fast unit tests (no root needed).
	go test -race -count=1 ./shared/... ./nodeplugin/... ./webhook/...

.PHONY: fuzz
fuzz: ## Run each fuzz target for FUZZ_TIME.
	@for t in $(FUZZ_TARGETS); do \
		pkg="./$${t%%:*}"; name="$${t##*:}"; \
		echo "fuzz $$pkg $$name for $(FUZZ_TIME)"; \
		go test -run '^$$' -fuzz "^$$name$$" -fuzztime $(FUZZ_TIME) "$$pkg"; \
	done

.PHONY: test-integration
test-integration: deps ## Root-only tests under test/: real mounts, registry, csi-sanity, envtest, deploy, e2e.
	KUBEBUILDER_ASSETS="$$(hack/install-deps.sh)" go test -count=1 -p 1 -timeout 60m ./test/...

##@ Cleanup

.PHONY: clean
clean: ## Remove build output.
	rm -rf $(BIN) _output
