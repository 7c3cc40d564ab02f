# make serve: serve the default example on 127.0.0.1:8000 (creates .venv and installs if missing)
# make test:  run the whole test suite
# make bench: the benchmark harness (writes bench/RESULTS.md, OIP's section by bench/oip.py; run it on an otherwise idle machine)
# make proto: the gRPC modules from policy_server/oip/grpc/inference.proto (committed; run after editing it)
# make soak:  64 clients for 10 minutes: no error, RSS and open files flat (writes bench/SOAK.md)
# make soak-experience: the same with the policy logging experience, every request naming an episode
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test bench soak soak-experience fuzz lint format proto

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

serve: install
	@test -f schema.yaml || $(PY) generate.py copy_server_files examples/mouse_and_cheese
	$(PY) generate.py serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m pip install --quiet -r requirements-bench.txt
	@command -v wrk >/dev/null || { echo "bench needs wrk: apt-get install -y wrk"; exit 1; }
	$(PY) bench/experience_writer.py
	$(PY) bench/run.py
	$(PY) bench/oip.py

proto: install
	$(PY) -m grpc_tools.protoc --proto_path=. --python_out=. --pyi_out=. --grpc_python_out=. policy_server/oip/grpc/inference.proto

soak: install
	@command -v wrk >/dev/null || { echo "soak needs wrk: apt-get install -y wrk"; exit 1; }
	$(PY) bench/soak.py

soak-experience: install
	@command -v wrk >/dev/null || { echo "soak needs wrk: apt-get install -y wrk"; exit 1; }
	$(PY) bench/soak.py --experience

# schemathesis, every check on, against real servers of the examples (and two test policies), at
# the full count; the suite runs the same with fewer cases. Prints cases, failures and time of each.
fuzz: install
	FUZZ_MAX_EXAMPLES=100 $(PY) -m pytest tests/test_schemathesis.py -k fuzz -s -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
