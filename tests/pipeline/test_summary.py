"""The end-of-run summary's "how to load the final model" lines work as printed, for a model on an object
store (a real S3 API: moto) too."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from moto.server import ThreadedMotoServer

from pipeline import storage
from pipeline.summary import _load_lines


def _tiny_model(path) -> None:
    import torch

    from stages.lm.hf import export_hf
    from stages.lm.model import CausalLM, ModelConfig
    from stages.tokenize.config import TrainTokenizer
    from stages.tokenize.tokenizer import save, train_bpe, vocab_size

    tok = train_bpe([f"def f{i}(x): return x + {i}" for i in range(200)],
                    TrainTokenizer(vocab_size=300, sample_docs=200))
    save(tok, str(path / "tokenizer"), model_max_length=64)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size(tok), dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=64)
    export_hf(CausalLM(cfg), str(path / "tokenizer"), str(path / "model"))


def test_printed_load_commands_load_a_model_from_s3(tmp_path, monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket="runs")
        _tiny_model(tmp_path)
        remote = "s3://runs/w/store/dpo-0123456789/model"
        for f in (tmp_path / "model").iterdir():
            storage.write_bytes(f"{remote}/{f.name}", f.read_bytes())

        lines = _load_lines(remote)
        assert len(lines) == 2 and "dpo-0123456789-model" in lines[1] and "s3://" not in lines[1]
        work = tmp_path / "user"
        work.mkdir()
        for line in lines:
            cmd = shlex.split(line.strip())
            cmd[0] = sys.executable
            subprocess.run(cmd, cwd=work, check=True,
                           env={**os.environ, **env}, capture_output=True, timeout=300)
        assert (work / "dpo-0123456789-model" / "config.json").is_file()
    finally:
        server.stop()


def test_local_model_is_loaded_where_it_is(tmp_path):
    (line,) = _load_lines(str(tmp_path / "model"))
    assert f"from_pretrained('{tmp_path / 'model'}')" in line
