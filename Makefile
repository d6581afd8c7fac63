# The two commands: `make run` (the default simulation) and `make test` (the whole suite).
# Both create .venv and install on first use. torch/torchvision are pinned to the
# releases that pip takes from local disk on these machines (no multi-GB download).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedclinic-installed
ARGS ?=

.PHONY: run deploy-demo test bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev]"
	# the tests' reference attack library; --no-deps because its metadata pins an old
	# requests that Flower cannot use (it never imports requests)
	$(BIN)/pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedclinic simulate $(ARGS)

deploy-demo: $(STAMP)
	$(BIN)/fedclinic demo $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q -n auto --dist loadscope --no-loadscope-reorder $(ARGS)

# every benchmark in bench/ (bench/utility.py alone takes about 1.5 h on 2 cores);
# bench/digits_npz.py is not one: it writes a dataset for bench/utility.py --data
bench: $(STAMP)
	for b in $(filter-out bench/digits_npz.py,$(wildcard bench/*.py)); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
