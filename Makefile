# The two commands a newcomer needs are `make demo` and `make test` (see README).
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:/usr/sbin:$(PATH)

.PHONY: deps demo test faults check bench clean

deps:
	@scripts/install-deps

demo: deps
	$(PY) scripts/demo.py

# pytest exits 5 when it collected no test: that fails here like any other error.
# Coverage includes every Python process the tests start (pyproject: patch = subprocess);
# the report is printed after the tests pass.
test: deps
	@rm -f .coverage .coverage.*
	@status=0; $(PY) -m coverage run -m pytest -q -p no:cacheprovider || status=$$?; \
	  $(PY) -m coverage combine -q && $(PY) -m coverage report | tail -n 25; \
	  exit $$status

# the fault suite at full size (tests/faults/: 50,000 readings, outages of minutes);
# `make test` runs its smaller variants
faults: deps
	FAULTS_FULL=1 $(PY) -m pytest -q -p no:cacheprovider --timeout=3600 tests/faults

check: deps
	$(PY) -m ruff check monitor sim tests bench scripts
	$(PY) -m mypy --strict

bench: deps
	$(PY) bench/run.py --out bench/results.json

clean:
	rm -rf .venv demo-data .mypy_cache .ruff_cache
