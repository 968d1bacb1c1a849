# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)

.PHONY: install demo test ui bench evaluate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,dist]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/meta-pipeline demo

# pytest exits 5 when it collects nothing; that is not a pass, but not a crash either.
test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

ui: $(STAMP)
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: $(STAMP)
	$(BIN)/meta-pipeline bench --tier small

evaluate: $(STAMP)
	$(BIN)/meta-pipeline evaluate

clean:
	rm -rf data/meta.db* data/inbox/* storage history schedules logs .logs_queue .telemetry .nux
