# The two set-up commands of the README:
#   make demo   a virtual environment with fogmesh, then `fogmesh demo` on embedded defaults
#   make test   the dev and train extras and the Mosquitto broker, then lint, type checks and every test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SECONDS ?= 20

.PHONY: demo test lint typecheck pytest broker clean models

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.fogmesh-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.fogmesh-dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,train]'
	touch $@ $(VENV)/.fogmesh-installed

demo: $(VENV)/.fogmesh-installed
	$(BIN)/fogmesh demo --seconds $(SECONDS)

# Mosquitto is a Debian package, not a Python one: install it where we can, else say how.
broker:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing mosquitto (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "make test needs the Mosquitto broker: sudo apt-get install -y mosquitto (Debian/Ubuntu), brew install mosquitto (macOS)" >&2; \
		exit 1; \
	fi

lint: $(VENV)/.fogmesh-dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.fogmesh-dev-installed
	$(BIN)/mypy

# pytest exits 5 when it collected no test; make treats that as a failure, as it should.
pytest: $(VENV)/.fogmesh-dev-installed broker
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

# The shipped models (models/shipped/README.md), retrained from the data sets beside the project.
DATA ?= ../shared/datasets
models: $(VENV)/.fogmesh-dev-installed
	$(BIN)/fogmesh model train --csv $(DATA)/skab/anomaly-free/anomaly-free.csv --rows 4000 \
		--detrend Temperature,Thermocouple --out models/shipped/pump
	$(BIN)/fogmesh model train --csv $(DATA)/nab/realKnownCause/machine_temperature_system_failure.csv \
		--rows 3404 --out models/shipped/generic

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache var
