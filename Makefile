PY := .venv/bin/python
UV := .venv/bin/uv
UV_VERSION := 0.13.9
TORCH := torch==2.13.0
LOCK := requirements/lock.txt
# Where the CPU build of torch lies (this machine kind's wheel folder): installed from there, and
# `make lock` resolves torch's own dependencies against it.
TORCH_WHEELS ?= /opt/wheels
UVPIP = $(UV) pip install -q --python $(PY) --no-deps --compile-bytecode
export DS_ACCELERATOR := cpu

# The environment is the lock file, installed as it is (no resolving at install time):
# 1. pip brings uv; uv installs torch's CPU build from TORCH_WHEELS (a folder or a find-links page,
#    e.g. https://download.pytorch.org/whl/cpu/torch): asked for `+cpu`, it never fetches a CUDA build;
# 2. uv installs every locked package except deepspeed, with hashes checked;
# 3. deepspeed is built against that environment (no build isolation), with its CPU shared-memory
#    communication op compiled now (DS_BUILD_SHM_COMM) rather than at the first training run;
# 4. Seedline itself, editable; then a consistency check and a guard against CUDA packages.
# Bytecode is compiled at install (as pip does): Ray starts its processes with -B, so without .pyc files
# every raylet agent compiles its imports at each start and misses Ray's 15 s agent deadline.
.venv/.installed: $(LOCK) pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(UVPIP) --find-links $(TORCH_WHEELS) "$(TORCH)+cpu"
	$(UVPIP) -r $(LOCK) --excludes requirements/built-last.txt
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(UVPIP) --no-build-isolation -r $(LOCK)
	$(UVPIP) --no-build-isolation -e .
	$(UV) pip check -q --python $(PY)
	@if $(UV) pip freeze -q --python $(PY) | grep -i '^nvidia-'; then echo "CUDA packages installed"; exit 1; fi
	touch .venv/.installed

# Refresh the lock after changing dependencies in pyproject.toml (all extras; Python 3.11, Linux x86_64).
# torch is resolved as its CPU build and left out of the file: it is installed first (see above).
.PHONY: lock
lock:
	test -x $(UV) || (python3 -m venv .venv && $(PY) -m pip install -q --no-deps uv==$(UV_VERSION))
	echo "$(TORCH)+cpu" > requirements/.torch-cpu.txt
	$(UV) pip compile -q pyproject.toml --all-extras --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_WHEELS) \
	    -c requirements/.torch-cpu.txt --no-emit-package torch --generate-hashes \
	    --custom-compile-command "make lock" -o $(LOCK)
	rm requirements/.torch-cpu.txt

.PHONY: demo test
demo: .venv/.installed
	.venv/bin/seedline example-data demo-data
	.venv/bin/seedline run configs/tiny.yaml
	.venv/bin/seedline report runs/tiny

test: .venv/.installed
	.venv/bin/python -m pytest -q --durations=30

# The 3-node Ray cluster tests (seedline submit, s3:// workdir, node loss, driver loss).
.PHONY: test-multinode
test-multinode: .venv/.installed
	.venv/bin/python -m pytest -q -m multinode tests/multinode

# A 3-node Ray cluster (head + 2 workers, 1 CPU each), a moto S3 endpoint and an MLflow server on
# 127.0.0.1, state in .seedline-cluster/; cluster-up prints the variables to export.
.PHONY: cluster-up cluster-down
cluster-up: .venv/.installed
	$(PY) -m cluster.local_cluster up .seedline-cluster

cluster-down:
	$(PY) -m cluster.local_cluster down .seedline-cluster
