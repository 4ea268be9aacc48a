# The README's two commands: `make demo` and `make test`. Both bootstrap a fresh machine:
# a .venv with every extra installed, and a Mosquitto binary (installed with apt-get when we
# are root and it is missing).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgectl-installed
PYTEST_ARGS ?=

.PHONY: all install mosquitto demo test lint clean

all: test

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "mosquitto is missing: installing it with apt-get"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto mosquitto-clients; \
	else \
		echo "error: the Mosquitto broker is not installed. Install it (Debian/Ubuntu: sudo apt-get install mosquitto; macOS: brew install mosquitto) and run make again." >&2; \
		exit 1; \
	fi

demo: install mosquitto
	PATH="$(CURDIR)/$(BIN):$$PATH:/usr/sbin" $(BIN)/edgectl demo

test: install mosquitto
	PATH="$(CURDIR)/$(BIN):$$PATH:/usr/sbin" $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check sdk agent server tests benchmarks

clean:
	rm -rf $(VENV) demo-run .pytest_cache
