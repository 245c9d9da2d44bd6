# saldo: `make test` runs everything; see README.md for the rest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test venv clean

# The virtual environment is rebuilt when a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# The whole suite, MySQL backend included: MariaDB is found, started or installed first, and the
# tests run against a throw-away database named after this run (dropped by the suite at its end).
test: venv
	@base_url=$$(PYTHON=$(PY) scripts/ensure-mariadb.sh) || exit 1; \
	echo "make test: MariaDB at $${base_url%%@*}@..., throw-away databases saldo_test_$$$$*"; \
	SALDO_TEST_MYSQL_URL="$$base_url/saldo_test_$$$$" SALDO_REQUIRE_MYSQL=1 \
		$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis results var
