"""The model trains under real DeepSpeed ZeRO-3 (CPU, gloo) exactly as it does without it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import json, torch, deepspeed
from stages.lm.model import CausalLM, ModelConfig

deepspeed.init_distributed(dist_backend="gloo")
results = {}
for tied in (False, True):
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      tie_embeddings=tied)
    torch.manual_seed(0)
    ref = CausalLM(cfg)
    torch.manual_seed(0)
    model = CausalLM(cfg)
    ids, labels = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    # no gradient clipping (DeepSpeed clips by default), nothing kept unpartitioned
    config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=config)
    losses = []
    for _ in range(2):
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        ref_loss = ref(ids, labels=labels).loss
        ref_loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
                p.grad = None
        losses.append([loss.item(), ref_loss.item()])
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        diff = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(),
                                                              ref.state_dict().values()))
    results[str(tied)] = {"losses": losses, "param_diff": diff}
    engine.destroy()
print("RESULT " + json.dumps(results))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_training_matches_plain_training():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line.removeprefix("RESULT "))
    for tied, r in results.items():
        for ours, ref in r["losses"]:
            assert abs(ours - ref) < 1e-5, tied
        assert r["losses"][1][0] < r["losses"][0][0]  # it learned
        assert r["param_diff"] < 1e-5, tied
