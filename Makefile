# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install sysdeps test lint demo clean bench

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@# torch from pip's configured index (the CPU build on this project's machines; README: plain PyPI serves the
	@# CUDA build, put the CPU wheel in first); a torch already in the venv (e.g. a CUDA build) is kept.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

# The report test renders HTML in headless Chromium (Debian's package); installed when missing and we may.
sysdeps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "note: chromium not installed; the report rendering test will be skipped"; }

lint: install
	$(BIN)/ruff check fairdiff_ray jobs tests bench

# Two pytest-xdist workers, each with its own local Ray cluster (tests/conftest.py); whole files per worker
# (module fixtures hold finished runs), the long files handed out first (conftest). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
test: install sysdeps lint
	$(BIN)/python -m pytest -q --timeout=900 --durations=15 -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

demo: install
	$(BIN)/python jobs/demo.py

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs/demo
