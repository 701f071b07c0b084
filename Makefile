# The two commands a new user types: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  ?= torch==2.13.0
MODEL  ?=
STAMP  := $(VENV)/.installed
# `make run` installs only what serving and the batch workers need (the image's extras, see Dockerfile);
# `make test` and the other targets install the dev extra (a superset: transformers, triton on Linux, ruff...).
RUN_EXTRAS ?= service,worker
RUN_STAMP  := $(VENV)/.installed-run
# checkov lives in its own virtualenv: its pins (packaging<24, networkx<2.7) clash with the project's.
CHECKOV      ?= checkov==3.3.30
CHECKOV_VENV := .cache/checkov-venv
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(subst ==,-,$(CHECKOV))
# promtool (tests/k8s parses and unit-tests the alert rules and parses the dashboard's queries with it) comes
# out of the distribution's prometheus package, unpacked, not installed: the binary links only libc. Debian
# bookworm's is 2.42.0; the download, as root, goes into a directory owned by _apt so apt needs no warning.
PROMTOOL_DEB ?= prometheus
PROMTOOL     := .cache/promtool/promtool

.PHONY: test lint format run proto checkov promtool clean data default-model gpu-site

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, pinned, so no dependency can pull a CUDA build; then the project in editable mode.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

$(RUN_STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[$(RUN_EXTRAS)]"
	touch $(RUN_STAMP)

$(CHECKOV_STAMP):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet "$(CHECKOV)"
	touch "$(CHECKOV_STAMP)"

checkov: $(CHECKOV_STAMP)

$(PROMTOOL):
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	if [ "$$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$$tmp"; fi && \
	(cd "$$tmp" && apt-get download -q "$(PROMTOOL_DEB)") && \
	dpkg-deb -x "$$tmp"/*.deb "$$tmp/x" && \
	"$$tmp/x/usr/bin/promtool" --version && \
	mkdir -p $(dir $(PROMTOOL)) && cp "$$tmp/x/usr/bin/promtool" $(PROMTOOL).part && mv $(PROMTOOL).part $(PROMTOOL)

promtool: $(PROMTOOL)

proto: $(STAMP)
	$(PY) -m service.protogen

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The suite in TEST_WORKERS processes (pytest-xdist), a test file per process at a time: much of it waits on
# real servers, workers and Redis, so two processes on two cores take ~0.6 of one's time. The slowest tests
# are listed at the end. `$(VENV)/bin/pytest` alone runs the suite in one process.
TEST_WORKERS ?= 2
test: lint proto checkov promtool
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# Serve the bundled model (or MODEL=dir) on [::]:50051; every flag also reads SAFETY_* (safety serve --help).
run: $(RUN_STAMP)
	$(VENV)/bin/safety serve $(if $(MODEL),--model $(MODEL))

# Training corpus for the bundled model: .cache/corpus/{train,valid}.jsonl + stats.json (docs/data.md).
data: $(STAMP)
	$(VENV)/bin/safety data build

# Rebuild model/default/ (the bundled model) reproducibly on CPU: corpus, training with the fixed recipe
# below, then evaluation on the hand-written sets in tests/data/ (reported, never used to train or tune).
DEFAULT_RECIPE := --config small --epochs 3 --lr 1e-3 --token-mask 0.3 --min-precision 0.8 --batch-tokens 8192 \
	--seed 13 --threads 2 --device cpu
DEFAULT_REPORT := tests/data/benign.jsonl tests/data/harmful.jsonl tests/data/response_pairs.jsonl
default-model: $(STAMP)
	$(VENV)/bin/safety data build
	rm -rf .cache/default-model
	$(VENV)/bin/safety train --data .cache/corpus/train.jsonl --valid .cache/corpus/valid.jsonl \
		$(DEFAULT_RECIPE) --name safety-modernbert-small --out .cache/default-model \
		$(foreach f,$(DEFAULT_REPORT),--report-set $(f))
	rm -rf model/default && cp -r .cache/default-model model/default
	$(foreach f,$(DEFAULT_REPORT),$(VENV)/bin/safety eval --model model/default --data $(f) \
		--out .cache/eval/$(basename $(notdir $(f))) &&) true

# What bench/gpu_all.sh needs on the GPU image beyond its torch/transformers/grpcio 1.84/protobuf: the service's
# pure-Python dependencies at versions that load under grpcio 1.84 (carried with the stubs in service/_proto),
# and COMMIT, the code measured (the GPU machine gets no .git; bench/gpu.py reports it): "<hash> clean", or
# "<hash> dirty <sha256 of the diff and the untracked files' list, 12 digits>". Run it right before the call.
GPU_SITE := .cache/gpu-site
gpu-site: proto
	rm -rf $(GPU_SITE)
	$(PIP) install --quiet --no-deps --target $(GPU_SITE) grpcio-health-checking==1.84.0 \
		grpcio-reflection==1.84.0 prometheus-client==0.26.0 googleapis-common-protos==1.76.0
	{ git rev-parse HEAD; if [ -n "$$(git status --porcelain)" ]; then echo dirty; \
		{ git diff HEAD; git status --porcelain; } | sha256sum | cut -c1-12; else echo clean; fi; } \
		| paste -sd' ' > $(GPU_SITE)/COMMIT
	cat $(GPU_SITE)/COMMIT

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(dir $(PROMTOOL)) service/_proto .pytest_cache .ruff_cache
