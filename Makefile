PY := .venv/bin/python
export DS_ACCELERATOR := cpu

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]" --no-deps
	$(PY) -m pip install -q pydantic pyyaml typer rich fsspec numpy pyarrow "mlflow[auth]" psutil matplotlib "ray[default,train,data]" datasketch xxhash zstandard tokenizers tiktoken transformers safetensors numba "moto[server]" s3fs "lm_eval[hf]>=0.4.13" datatrove pytest pytest-timeout ruff
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation deepspeed
	touch .venv/.installed

.PHONY: demo test
demo: .venv/.installed
	.venv/bin/seedline example-data demo-data
	.venv/bin/seedline run configs/tiny.yaml
	.venv/bin/seedline report runs/tiny

test: .venv/.installed
	.venv/bin/python -m pytest -q

# A 3-node Ray cluster (head + 2 workers, 1 CPU each), a moto S3 endpoint and an MLflow server on
# 127.0.0.1, state in .seedline-cluster/; cluster-up prints the variables to export.
.PHONY: cluster-up cluster-down
cluster-up: .venv/.installed
	$(PY) -m cluster.local_cluster up .seedline-cluster

cluster-down:
	$(PY) -m cluster.local_cluster down .seedline-cluster
