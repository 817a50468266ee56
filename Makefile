# apm-csi — run `make help` for the targets.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GOARCH  ?= $(shell go env GOARCH)
LDFLAGS := -s -w -X github.com/apm-csi/apm-csi/shared/version.Version=$(VERSION)
BIN     := bin

# Fuzz targets run briefly by `make fuzz` (and so by CI): <package dir>:<FuzzName>[:<budget>].
# Budgets are execution counts, not durations: Go 1.26's fuzz coordinator can fail a
# time-bounded run with "context deadline exceeded" (golang/go#75804), and counts also keep
# CI's coverage the same on fast and slow machines.
FUZZ_TARGETS := shared/volumeattrs:FuzzParse shared/volumeattrs:FuzzParseWritableLimit nodeplugin/hostdir:FuzzParseEntry nodeplugin/hostdir:FuzzParseConfig webhook/annotations:FuzzParseVolume nodeplugin/librarycache/extract:FuzzExtractEntries:10000x nodeplugin/state:FuzzDecodeRecord
FUZZ_EXECS   ?= 100000x

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

# Supported Kubernetes versions: the newest (K8S_VERSION) runs everything, the oldest
# (K8S_MIN_VERSION) also runs the deploy validation (dry run and admission policy on a real
# kube-apiserver). Both are built through the Go module proxy and cached by version.
K8S_VERSION     ?= 1.37.2
K8S_MIN_VERSION ?= 1.35.4
export K8S_VERSION
# envtest's kube-apiserver start timeout (its default, 20 s, is too short for kube-apiserver
# 1.37 on a busy 2-core machine).
export KUBEBUILDER_CONTROLPLANE_START_TIMEOUT ?= 60s

.PHONY: test
test: deps lint test-unit fuzz test-integration ## Everything CI runs: deps, lint, unit, fuzz, root integration, sanity, envtest, deploy, e2e.

.PHONY: deps
deps: ## Install Debian packages and build/cache the Kubernetes binaries and container runtime the tests need.
	@hack/install-deps.sh >/dev/null
	@hack/install-deps.sh --apiserver-only $(K8S_MIN_VERSION) >/dev/null

.PHONY: lint
lint: lint-go lint-golangci lint-shell ## Every linter: Go (gofmt, go vet, golangci-lint) and shell scripts (shellcheck).

.PHONY: lint-go
lint-go: ## gofmt and go vet.
	@out="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"; \
		if [[ -n "$$out" ]]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
	go vet ./...

.PHONY: lint-golangci
lint-golangci: ## golangci-lint with .golangci.yml (built through the Go module proxy when missing).
	"$$(hack/golangci-lint.sh)" run ./...

.PHONY: lint-shell
lint-shell: ## shellcheck on hack/*.sh and .ci/run (installs Debian's shellcheck when missing).
	@hack/shellcheck.sh

.PHONY: test-unit
test-unit: ## Fast unit tests (no root needed).
	go test -race -count=1 ./shared/... ./nodeplugin/... ./webhook/...

.PHONY: fuzz
fuzz: ## Run each fuzz target for its execution budget (default FUZZ_EXECS).
	@for t in $(FUZZ_TARGETS); do \
		IFS=: read -r dir name budget <<<"$$t"; budget="$${budget:-$(FUZZ_EXECS)}"; \
		echo "fuzz ./$$dir $$name for $$budget"; \
		go test -run '^$$' -fuzz "^$$name$$" -fuzztime "$$budget" "./$$dir"; \
	done

.PHONY: test-integration
test-integration: deps ## Root-only tests under test/: real mounts, registry, csi-sanity, envtest, deploy, e2e.
	KUBEBUILDER_ASSETS="$$(hack/install-deps.sh)" KUBEBUILDER_ASSETS_MIN="$$(hack/install-deps.sh --apiserver-only $(K8S_MIN_VERSION))" \
		go test -count=1 -p 1 -timeout 60m ./test/...

##@ Docs

.PHONY: docs
docs: ## Regenerate the flag tables in README.md and docs/*.md from the binaries' flag sets.
	UPDATE_FLAG_DOCS=1 go test -p 1 -count=1 -run '^TestFlagTablesMatchFlags$$' ./nodeplugin/cmd/apm-csi-node ./webhook/cmd/apm-csi-webhook

##@ Cleanup

.PHONY: clean
clean: ## Remove build output.
	rm -rf $(BIN) _output

##@ Local cluster

# Image tarballs for the local cluster; project images are tagged localhost/apm-csi/<name>:$(IMAGE_TAG).
IMAGES_DIR ?= _output/images
IMAGE_TAG  ?= local
# State directory of the local cluster (certificates, etcd, containerd, kubelet dir, logs).
CLUSTER_ROOT ?= /var/lib/apm-csi-localcluster

.PHONY: images
images: ## Build image tarballs into IMAGES_DIR: pause, busybox, and one per static binary in ./bin (run `make build` first).
	@mkdir -p $(BIN) $(IMAGES_DIR)
	@hack/install-deps.sh --packages-only
	go build -o $(BIN)/build-images ./test/images/cmd/build-images
	$(BIN)/build-images base -out $(IMAGES_DIR)
	@for b in apm-csi-node apm-csi-webhook; do \
		if [[ -x $(BIN)/$$b ]]; then \
			$(BIN)/build-images binary -ref localhost/apm-csi/$$b:$(IMAGE_TAG) -out $(IMAGES_DIR)/$$b.tar \
				-bin $(BIN)/$$b:/usr/local/bin/$$b -label org.opencontainers.image.version=$(VERSION); \
		fi; \
	done

.PHONY: cluster-up
cluster-up: ## Start the local single-node cluster (root) and import the tarballs in IMAGES_DIR.
	@mkdir -p $(BIN)
	go build -o $(BIN)/localcluster ./test/localcluster/cmd/localcluster
	$(BIN)/localcluster up -root $(CLUSTER_ROOT)
	@shopt -s nullglob; tarballs=($(IMAGES_DIR)/*.tar); \
		if (($${#tarballs[@]})); then $(BIN)/localcluster import -root $(CLUSTER_ROOT) "$${tarballs[@]}"; fi

.PHONY: cluster-down
cluster-down: ## Stop the local cluster and remove everything it started: processes, mounts, bridge, iptables rules (root).
	@mkdir -p $(BIN)
	go build -o $(BIN)/localcluster ./test/localcluster/cmd/localcluster
	$(BIN)/localcluster down -root $(CLUSTER_ROOT)

##@ Deploy

MANIFESTS_DIR ?= _output/manifests
CHART         := deploy/helm/apm-csi
CHART_KUBE_VERSION ?= $(K8S_VERSION)

.PHONY: helm
helm: ## Build helm through the Go module proxy (cached under ~/.cache/apm-csi/helm) and print its path.
	@hack/helm.sh

.PHONY: manifests
manifests: ## Render every kustomize overlay and every chart values file (ci/*-values.yaml) into MANIFESTS_DIR.
	@mkdir -p $(MANIFESTS_DIR)
	@kubectl="$$(hack/k8s-binaries.sh)/kubectl"; helm="$$(hack/helm.sh)"; \
		for o in deploy/overlays/*/; do \
			o="$${o%/}"; echo "kustomize $$o -> $(MANIFESTS_DIR)/kustomize-$${o##*/}.yaml"; \
			"$$kubectl" kustomize "$$o" >"$(MANIFESTS_DIR)/kustomize-$${o##*/}.yaml"; \
		done; \
		echo "helm $(CHART) -> $(MANIFESTS_DIR)/helm-defaults.yaml"; \
		"$$helm" template apm-csi $(CHART) --namespace apm-csi-system --kube-version $(CHART_KUBE_VERSION) >"$(MANIFESTS_DIR)/helm-defaults.yaml"; \
		for v in $(CHART)/ci/*-values.yaml; do \
			n="$${v##*/}"; n="$${n%-values.yaml}"; echo "helm $(CHART) -f $$v -> $(MANIFESTS_DIR)/helm-$$n.yaml"; \
			"$$helm" template apm-csi $(CHART) --namespace apm-csi-system --kube-version $(CHART_KUBE_VERSION) --values "$$v" >"$(MANIFESTS_DIR)/helm-$$n.yaml"; \
		done

.PHONY: helm-lint
helm-lint: ## helm lint --strict the chart with its defaults and with every ci/*-values.yaml.
	@helm="$$(hack/helm.sh)"; \
		"$$helm" lint $(CHART) --strict --kube-version $(CHART_KUBE_VERSION); \
		for v in $(CHART)/ci/*-values.yaml; do "$$helm" lint $(CHART) --strict --kube-version $(CHART_KUBE_VERSION) --values "$$v"; done

.PHONY: test-deploy
test-deploy: deps ## Deploy checks alone: render, dry-run on real kube-apiservers (oldest and newest supported), flags vs binaries, RBAC, chart schema.
	KUBEBUILDER_ASSETS="$$(hack/install-deps.sh)" KUBEBUILDER_ASSETS_MIN="$$(hack/install-deps.sh --apiserver-only $(K8S_MIN_VERSION))" \
		HELM="$$(hack/helm.sh)" go test -count=1 -timeout 20m ./test/deploy/...

##@ Demo and end-to-end

.PHONY: demo
demo: deps build images ## Run it: local cluster + apm-csi + an instrumented Node.js app, explained step by step (root).
	@hack/install-deps.sh >/dev/null
	go build -o $(BIN)/localcluster ./test/localcluster/cmd/localcluster
	go build -o $(BIN)/apm-csi-demo ./test/e2e/cmd/apm-csi-demo
	$(BIN)/apm-csi-demo -root $(CLUSTER_ROOT) -images $(IMAGES_DIR) -localcluster $(BIN)/localcluster

.PHONY: demo-down
demo-down: ## Remove everything `make demo` started: cluster processes, pods, mounts, bridge, iptables rules, its files (root).
	@mkdir -p $(BIN)
	go build -o $(BIN)/localcluster ./test/localcluster/cmd/localcluster
	$(BIN)/localcluster down -root $(CLUSTER_ROOT) -purge

# E2E_RUN selects scenarios by subtest name, spaces as underscores, e.g.
# E2E_RUN='TestEndToEnd/registry_down' (default: all, and the cluster smoke test).
E2E_RUN ?= .

.PHONY: test-e2e
test-e2e: deps ## End-to-end scenarios alone on a real single-node cluster with a real tracer (root; `make test` runs them too).
	KUBEBUILDER_ASSETS="$$(hack/install-deps.sh)" go test -count=1 -v -timeout 40m -run '$(E2E_RUN)' ./test/e2e/...

##@ Benchmarks

# Extra flags of apm-csi-bench, e.g. BENCH_FLAGS='-reps 2 -scale-pods 10 -keep' for a quick run (see `bin/apm-csi-bench -h`).
BENCH_FLAGS ?=

.PHONY: bench
bench: build images ## Benchmark on the local cluster (root, ~25-35 min): pod start of every delivery method, 60 pods at once, disk, registry, admission, publish; writes docs/benchmarks.{md,png}.
	@hack/install-deps.sh >/dev/null
	go build -o $(BIN)/apm-csi-bench ./test/bench/cmd/apm-csi-bench
	$(BIN)/apm-csi-bench -root $(CLUSTER_ROOT) -images $(IMAGES_DIR) -out docs -version $(VERSION) $(BENCH_FLAGS)
