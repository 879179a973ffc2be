"""Files Seedline writes get the mode a new file gets under the umask (world-readable under 022), even
when the writer created its temporary file 0600 (safetensors, tempfile)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from pipeline import storage

REPO = Path(__file__).resolve().parents[2]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_writes_are_world_readable_under_umask_022(tmp_path):
    expected = 0o666 & ~storage._read_umask()
    storage.write_text(str(tmp_path / "a.json"), "{}")
    with storage.atomic_local_file(str(tmp_path / "w.bin")) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors and mkstemp do
        os.write(fd, b"weights")
        os.close(fd)
    assert _mode(tmp_path / "w.bin") == _mode(tmp_path / "a.json") == expected
    assert (tmp_path / "w.bin").read_bytes() == b"weights"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_the_umask_is_respected(tmp_path):
    code = ("import os\nfrom pipeline import storage\n"
            "with storage.atomic_local_file(os.environ['OUT']) as t:\n"
            "    os.close(os.open(t, os.O_WRONLY | os.O_CREAT, 0o600))\n")
    for umask, want in ((0o027, 0o640), (0o022, 0o644), (0o077, 0o600)):
        out = tmp_path / f"f{umask:o}"
        subprocess.run([sys.executable, "-c", f"import os; os.umask({umask}); exec({code!r})"],
                       cwd=REPO, env={**os.environ, "OUT": str(out)}, check=True)
        assert _mode(out) == want, oct(umask)


def test_exported_safetensors_weights_are_world_readable(tmp_path):
    import torch

    from stages.lm.hf import export_hf
    from stages.lm.model import CausalLM, ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64,
                                 max_seq_len=32))
    export_hf(model, None, str(tmp_path / "m"), max_shard_bytes=20_000)  # shards + index too
    files = sorted((tmp_path / "m").iterdir())
    assert any(p.suffix == ".safetensors" for p in files)
    want = oct(0o666 & ~storage._read_umask())  # 0o644 under the usual umask 022
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: want for p in files}
