# Two commands for a fresh machine: `make test` and `make demo` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.interlace-installed
PYTEST_ARGS ?=

.PHONY: test demo env

$(STAMP): pyproject.toml setup.py tools/bootstrap.py CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) tools/bootstrap.py --venv $(VENV)
	@touch $@

test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): that is a failure"; fi; \
	exit $$rc

demo: $(STAMP)
	$(PY) -m bench demo

env: $(STAMP)
	$(PY) -m interlace env
