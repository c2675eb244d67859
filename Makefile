# Everyday targets. `make test` is what CI runs (after `make lint`); it installs what it needs:
# Rust crates via cargo, Go modules via the module proxy, the test control plane (kube-apiserver,
# kube-controller-manager, kubectl, etcd) built once into ~/.cache/gonka-operator, the
# reference Python packages (numpy, torch, transformers) into .cache/pyenv, and vLLM's CPU build
# into its own venv under ~/.cache/gonka-operator.

CARGO ?= cargo

.PHONY: build test unit e2e controlplane pyenv vllm-env crds manifests images image-vllm lint fmt demo bench bench-poc bench-inference bench-fleet bench-scale gpu-kit gpu-kit-check clean-cache

# The tests compare against numpy through this interpreter.
export GONKA_PYTHON := $(CURDIR)/.cache/pyenv/bin/python
# libtorch from the venv (evaluated when used, after `pyenv` installed it).
LIBTORCH_DIR = $(shell scripts/pyenv.sh --libtorch)

build: pyenv
	$(CARGO) build --workspace --exclude gonka-inference --locked
	LIBTORCH=$(LIBTORCH_DIR) $(CARGO) build --locked -p gonka-inference -p gonka-node-daemon --features gonka-node-daemon/torch

## The two newcomer commands (README): `make demo` and `make test`.
demo: controlplane pyenv vllm-env
	LIBTORCH=$(LIBTORCH_DIR) $(CARGO) build --locked -q -p gonka-node-daemon --features torch
	GONKA_DAEMON_BIN=$${CARGO_TARGET_DIR:-$(CURDIR)/target}/debug/gonka-node-daemon \
		GONKA_VLLM_PYTHON=$$(scripts/vllm-env.sh) \
		$(CARGO) run --locked -q -p gonka-e2e --bin gonka-demo

test: controlplane pyenv vllm-env
	$(CARGO) test --workspace --exclude gonka-inference --locked
	GONKA_VLLM_PYTHON=$$(scripts/vllm-env.sh) LIBTORCH=$(LIBTORCH_DIR) \
		$(CARGO) test --locked -p gonka-inference -p gonka-node-daemon --features gonka-node-daemon/torch
	# The GPU kit's CPU part on the binaries just built (docs/gpu-kit.md).
	scripts/gpu-kit.sh --cpu-here

## manifests/ rendered from the Helm chart (helm is built with the control plane).
manifests:
	scripts/render-manifests.sh

## Container images, tagged with the crates' version (the chart's default tags). Any of docker,
## podman or buildah; IMAGE_REPO names your registry (push with `$(CONTAINER) push <image>`).
CONTAINER ?= $(shell command -v docker || command -v podman || command -v buildah)
IMAGE_REPO ?= ghcr.io/gonka-operator
VERSION := $(shell awk -F'"' '/^version = /{print $$2; exit}' Cargo.toml)
images:
	$(CONTAINER) build -f images/operator/Dockerfile -t $(IMAGE_REPO)/gonka-operator:$(VERSION) .
	$(CONTAINER) build -f images/node-daemon/Dockerfile -t $(IMAGE_REPO)/gonka-node-daemon:$(VERSION) .

## The node-daemon on upstream's ML-node image (vLLM for the network's models), FROM the image
## `make images` built; pulls upstream's image (MLNODE_IMAGE overrides its pinned tag).
image-vllm:
	$(CONTAINER) build -f images/node-daemon-vllm/Dockerfile \
		--build-arg DAEMON_IMAGE=$(IMAGE_REPO)/gonka-node-daemon:$(VERSION) \
		$(if $(MLNODE_IMAGE),--build-arg MLNODE_IMAGE=$(MLNODE_IMAGE)) \
		-t $(IMAGE_REPO)/gonka-node-daemon-vllm:$(VERSION) .

## Pure and mocked-API tests only: no control plane, seconds.
unit:
	$(CARGO) test --workspace --exclude gonka-inference --locked --lib --bins

## Real control-plane tests only.
e2e: controlplane
	$(CARGO) test --locked -p gonka-e2e

## Build (or find in the cache) the control-plane binaries before tests start in parallel.
controlplane:
	@e2e/controlplane/build.sh >/dev/null

## The project's Python with the reference packages the tests compare against.
pyenv:
	@scripts/pyenv.sh >/dev/null

## vLLM's CPU build in its own venv (under ~/.cache/gonka-operator), for the vLLM-engine tests.
vllm-env:
	@scripts/vllm-env.sh >/dev/null

## Regenerate the CRD YAML from the Rust types (crds/ and the chart's copy), then manifests/.
crds:
	$(CARGO) run --locked -q -p gonka-operator -- crd > crds/gonkanode.yaml.tmp
	mv crds/gonkanode.yaml.tmp crds/gonkanode.yaml
	cp crds/gonkanode.yaml charts/gonka-operator/files/gonkanode.yaml
	scripts/render-manifests.sh

## Benchmarks (not tests), appended to docs/benchmarks.md: PoC v1 nonces/s, Rust next to
## PyTorch; inference and PoC v2 next to transformers; and the operator over a kwok fleet
## (time to register, steady-state cost).
bench: bench-poc bench-inference bench-fleet bench-scale

## The GPU check as one folder under 64 MiB (target/gpu-kit/kit; docs/gpu-kit.md): binaries
## built against libtorch 2.11, the Python peers, run.sh. `gpu-kit-check` runs its CPU part.
gpu-kit: pyenv
	scripts/gpu-kit.sh

gpu-kit-check: pyenv
	scripts/gpu-kit.sh --check

bench-poc: pyenv
	bench/run.sh

## Prefill/decode tokens/s and PoC v2 nonces/s of the inference engine next to transformers and
## vLLM: the dense Qwen3, then the mixtures of experts (BENCH_ARCH picks one).
BENCH_ARCHS ?= $(or $(BENCH_ARCH),qwen3 qwen3_moe minimax_m2 deepseek_v4)
bench-inference: pyenv vllm-env
	for arch in $(BENCH_ARCHS); do BENCH_ARCH=$$arch bench/inference.sh || exit 1; done

## The install at scale: the chart, the operator as its own process, 1000 kwok nodes, 50
## GonkaNodes, 5 minutes at rest (docs/benchmarks.md).
SCALE_NODES ?= 1000
SCALE_GONKA_NODES ?= 50
bench-scale: controlplane
	$(CARGO) build --release --locked -q -p gonka-operator -p gonka-e2e --bin gonka-scale-bench --bin gonka-operator
	$${CARGO_TARGET_DIR:-$(CURDIR)/target}/release/gonka-scale-bench --nodes $(SCALE_NODES) --gonka-nodes $(SCALE_GONKA_NODES) --write

FLEET_NODES ?= 1000
bench-fleet: controlplane
	$(CARGO) run --release --locked -q -p gonka-e2e --bin gonka-fleet-bench -- --nodes $(FLEET_NODES) --write

lint: pyenv
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --exclude gonka-inference --all-targets --locked -- -D warnings
	LIBTORCH=$(LIBTORCH_DIR) $(CARGO) clippy --locked -p gonka-inference -p gonka-node-daemon --features gonka-node-daemon/torch --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean-cache:
	rm -rf $${GONKA_CACHE_DIR:-$$HOME/.cache/gonka-operator}
