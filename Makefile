# saldo: `make test` runs everything; see README.md for the rest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Lab parameters: make bench ARCH=sequencer CLIENTS=8 DURATION=10 REPEAT=3; make chaos FAULTS=kill-replica
# WINDOW: operations in flight per client (8 clients: 16 = moderate load, 64 = saturation).
# MIX: mixed (with 20% balance reads), writes (only operations the replicas apply), or weights.
ARCH ?= all
CLIENTS ?= 1,8
WINDOW ?= 16,64
DURATION ?= 10
REPEAT ?= 3
MIX ?= mixed
FAULTS ?= kill-replica
PORTS ?= seed
comma := ,

.PHONY: test venv deploy-tools deploy-check clean demo up bench bench-farm chaos

# The virtual environment is rebuilt when a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# The deployment's tools (ansible, ansible-lint, boto3, moto), for make deploy-check and the deployment tests.
$(VENV)/.deploy-installed: requirements-deploy.txt $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-deploy.txt
	touch $@

deploy-tools: $(VENV)/.deploy-installed

# ansible-lint (production profile) over ansible/, and a syntax check of every playbook. Both read
# only the seed's inventory: the AWS one would ask AWS (or the instance metadata address) for hosts.
DEPLOY_CHECK_ENV := PATH="$(abspath $(VENV))/bin:$$PATH" ANSIBLE_INVENTORY=inventory/seed.yml AWS_EC2_METADATA_DISABLED=true
deploy-check: deploy-tools
	cd ansible && $(DEPLOY_CHECK_ENV) ansible-lint
	cd ansible && for playbook in provision.yml deploy.yml teardown.yml; do \
		$(DEPLOY_CHECK_ENV) ansible-playbook --syntax-check $$playbook || exit 1; \
	done

# The whole suite, MySQL backend included: MariaDB is found, started or installed first, and the
# tests run against a throw-away database named after this run (dropped by the suite at its end).
test: venv deploy-tools
	@base_url=$$(PYTHON=$(PY) scripts/ensure-mariadb.sh) || exit 1; \
	echo "make test: MariaDB at $${base_url%%@*}@..., throw-away databases saldo_test_$$$$*"; \
	SALDO_TEST_MYSQL_URL="$$base_url/saldo_test_$$$$" SALDO_REQUIRE_MYSQL=1 SALDO_REQUIRE_DEPLOY=1 \
		$(PY) -m pytest $(PYTEST_ARGS)

# The first command of the README: needs nothing but python3 (SQLite is in the standard library).
demo:
	$(PYTHON) lab.py demo --ports $(PORTS)

# A cluster that stays up until Ctrl-C, for client.py: make up ARCH=sequencer
up:
	$(PYTHON) lab.py up --arch $(if $(filter all,$(ARCH)),sequencer,$(ARCH)) --ports $(PORTS)

# Workloads without faults, each with the echo reference measured in the same run; medians of REPEAT.
# ARCH=all: every bank architecture on SQLite, then the worker farm on MariaDB (bench-farm).
bench:
ifeq ($(ARCH),farm)
	$(MAKE) bench-farm
else
	$(PYTHON) lab.py bench --arch $(ARCH) --clients $(CLIENTS) --window $(WINDOW) --mix $(MIX) --duration $(DURATION) --repeat $(REPEAT) --ports $(PORTS)
ifeq ($(ARCH),all)
	$(MAKE) bench-farm
endif
endif

# The worker farm on MariaDB: tasks/s with 1, 2 and 4 workers, how fast workers are lent and returned,
# one summary table; its database (saldo_bench_farm) is dropped at the end.
bench-farm: venv
	@base_url=$$(PYTHON=$(PY) scripts/ensure-mariadb.sh) || exit 1; \
	$(PY) lab.py farm-bench --store "$$base_url/saldo_bench" --duration $(DURATION) --repeat $(REPEAT) --ports $(PORTS)

# Workloads with a fault schedule (FAULTS=kill-replica, partition-replica, kill-sequencer, ...).
chaos:
	$(PYTHON) lab.py chaos --arch $(if $(filter all,$(ARCH)),sequencer,$(ARCH)) --clients $(lastword $(subst $(comma), ,$(CLIENTS))) \
		--window $(firstword $(subst $(comma), ,$(WINDOW))) --duration $(DURATION) --faults $(FAULTS) --ports $(PORTS)

# Everything the project writes: the venv, lab reports (results/), run directories and every
# `make up` cluster's stores and logs (var/).
clean:
	rm -rf $(VENV) .pytest_cache .hypothesis results var
