# The two commands of the README: `make demo` and `make test`. Each does its own set-up.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The machine may point PIP_FIND_LINKS at a CPU-only torch wheel with which torchvision
# does not import; install the registry's torch like any user (docs/install.md).
PIP := env -u PIP_FIND_LINKS $(BIN)/pip
export OMP_NUM_THREADS ?= 1
export MLFLOW_DISABLE_TELEMETRY := true
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

DEMO_DEBS := dataset-fashion-mnist curl
TEST_DEBS := dataset-fashion-mnist curl iproute2 util-linux mount g++ python3-dev slurm-wlm slurmctld slurmd slurm-client slurmdbd munge mariadb-server postgresql

.PHONY: demo test lint venv debs-demo debs-test bench clean

$(BIN)/dist-train: pyproject.toml requirements/pins.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q -c requirements/pins.txt -e '.[all,test]'
	touch $@

venv: $(BIN)/dist-train

define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

debs-demo:
	$(call apt_install,$(DEMO_DEBS))

debs-test:
	$(call apt_install,$(TEST_DEBS))

demo: debs-demo venv
	$(BIN)/python -m dist_train.demo

# ruff (lint and import order, pyproject.toml) and mypy on dist_train/: a new violation fails make test.
lint: venv
	$(BIN)/ruff check dist_train tests benchmarks
	$(BIN)/mypy

# pytest exits 5 when it collected no tests; that is a failure here, and says so.
test: debs-test venv lint
	@DIST_TRAIN_REQUIRE_INFRA=1 $(BIN)/python -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests - failing" >&2; fi; exit $$rc

clean:
	rm -rf $(VENV) .cache data/shards runs mlruns mlflow.db
