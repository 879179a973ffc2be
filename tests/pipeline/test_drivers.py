"""Real driver processes: a killed stage resumes from its shard markers, two racing drivers run a stage
once, and `seedline plan` / `seedline status --json` describe the run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# A user-defined stage, loaded through SEEDLINE_STAGE_MODULES as a project's own stage would be: it writes
# one output file per shard, slowly, with a marker after each, and records every shard it computes.
PLUGIN = textwrap.dedent('''
    import os, time
    from pathlib import Path
    from pipeline import storage
    from pipeline.stage import StrictModel, register, volatile

    class SlowConfig(StrictModel):
        shards: int = 6
        scale: int = 1
        delay: float = volatile(0.3)

    def run(config, ctx):
        log = Path(os.environ["SLOW_LOG"])
        for i in range(config.shards):
            marker = ctx.path(f"shard-{i}.done")
            if storage.exists(marker):
                continue
            time.sleep(config.delay)
            with log.open("a") as f:
                f.write(f"{ctx.name} {i}\\n")
            storage.write_text(ctx.path(f"shard-{i}.txt"), str(i * config.scale))
            storage.touch_marker(marker)
            ctx.progress.update(done=i + 1, total=config.shards, unit="shards")

    register("slow", SlowConfig, "1", f"{__name__}:run")
    register("after", SlowConfig, "1", f"{__name__}:run", consumes=("slow",))
''')


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    env = dict(os.environ, SEEDLINE_STAGE_MODULES="slowplugin", SLOW_LOG=str(tmp_path / "calls.log"),
               SEEDLINE_LEASE_TTL="3")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")])
    return env


def _config(tmp_path: Path, scale: int = 1, name: str = "p") -> Path:
    f = tmp_path / f"{name}-{scale}.yaml"
    f.write_text(f"name: {name}\nworkdir: {tmp_path / 'w'}\ntracking: {{enabled: false}}\n"
                 f"stages:\n  slow: {{scale: {scale}}}\n  after: {{shards: 2, delay: 0.0}}\n")
    return f


def _seedline(env, *args, check=True):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          check=check, timeout=120)


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def _outputs(stage_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(stage_dir.glob("shard-*.txt"))}


def test_killed_driver_resumes_from_markers(tmp_path):
    env = _env(tmp_path)
    cfg = _config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(_calls(tmp_path)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _calls(tmp_path)
    assert 3 <= len(done_before) < 6

    run_dir = tmp_path / "w" / "p"
    rows = {r["stage"]: r for r in json.loads(_seedline(env, "status", str(run_dir), "--json").stdout)}
    assert rows["slow"]["state"] == "running" and rows["slow"]["progress"]["done"] >= 1

    time.sleep(3.2)  # the dead driver's lease goes stale
    _seedline(env, "run", str(cfg))
    calls = _calls(tmp_path)
    slow_calls = [c for c in calls if c.startswith("slow")]
    # Shards finished before the kill are not computed again (at most the one in flight is).
    assert len(slow_calls) <= 7 and sorted(set(slow_calls)) == [f"slow {i}" for i in range(6)]
    rows = {r["stage"]: r for r in json.loads(_seedline(env, "status", str(run_dir), "--json").stdout)}
    assert rows["slow"]["state"] == rows["after"]["state"] == "succeeded"
    slow_dir = run_dir.parent / "store" / f"slow-{rows['slow']['fingerprint']}"
    assert _outputs(slow_dir) == {f"shard-{i}.txt": str(i) for i in range(6)}


def test_two_racing_drivers_run_each_stage_once(tmp_path):
    env = _env(tmp_path)
    cfg = _config(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted(_calls(tmp_path)) == sorted([f"slow {i}" for i in range(6)] + ["after 0", "after 1"])


@pytest.mark.parametrize("override", ["stages.slow.scale=3"])
def test_plan_names_changed_keys_and_dependents(tmp_path, override):
    env = _env(tmp_path)
    cfg = _config(tmp_path)
    _seedline(env, "run", str(cfg), "-s", "stages.slow.delay=0")
    unchanged = _seedline(env, "plan", str(cfg)).stdout.splitlines()
    assert [line.split()[:2] for line in unchanged] == [["slow", "skip"], ["after", "skip"]]
    # A volatile key changes nothing.
    assert _seedline(env, "plan", str(cfg), "-s", "stages.slow.delay=5").stdout.splitlines() == unchanged
    changed = _seedline(env, "plan", str(cfg), "-s", override).stdout.splitlines()
    assert changed[0].split()[:2] == ["slow", "run"] and "changed: stages.slow.scale" in changed[0]
    assert changed[1].split()[:2] == ["after", "run"] and "an upstream stage changed" in changed[1]


def test_status_does_not_import_torch_or_ray(tmp_path):
    env = _env(tmp_path)
    cfg = _config(tmp_path)
    _seedline(env, "run", str(cfg), "-s", "stages.slow.delay=0")
    probe = ("import sys, runpy; sys.argv = ['seedline', 'status', sys.argv[1], '--json']\n"
             "try:\n    runpy.run_module('pipeline', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "w" / "p")], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and '"state": "succeeded"' in out
