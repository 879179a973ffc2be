"""Experiments: stage instances, input bindings, declared outputs, a store shared across runs, gc, plan."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline import stage as registry
from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.graph import order
from pipeline.runner import run_pipeline
from pipeline.stage import InputSlot, StrictModel
from pipeline.store import collect, unreferenced

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, SEEDLINE_STAGE_MODULES="tests.pipeline.test_experiments")
CALLS: list[str] = []


class SrcConfig(StrictModel):
    n: int = 3


class TrainConfig(StrictModel):
    lr: float = 1.0
    init_from: str | None = None


class EvalConfig(StrictModel):
    models: list[str] | None = None


def src_run(config: SrcConfig, ctx) -> None:
    CALLS.append(ctx.name)
    (Path(ctx.out_dir) / "docs").mkdir(parents=True, exist_ok=True)
    (Path(ctx.out_dir) / "docs" / "n.txt").write_text(str(config.n))


def tok_run(config: SrcConfig, ctx) -> None:
    CALLS.append(ctx.name)
    n = int((Path(ctx.input("docs").path) / "n.txt").read_text())
    (Path(ctx.out_dir) / "shards.txt").write_text(str(n * 10))


def train_run(config: TrainConfig, ctx) -> None:
    CALLS.append(ctx.name)
    data = int((Path(ctx.input("data").path) / "shards.txt").read_text())
    init = ctx.input("init")
    start = float((Path(init.path) / "w.txt").read_text()) if init else 0.0
    (Path(ctx.out_dir) / "model").mkdir(parents=True, exist_ok=True)
    (Path(ctx.out_dir) / "model" / "w.txt").write_text(str(start + data * config.lr))


def eval_run(config: EvalConfig, ctx) -> None:
    CALLS.append(ctx.name)
    scores = {m.instance: float((Path(m.path) / "w.txt").read_text()) for m in ctx.input_list("models")}
    (Path(ctx.out_dir) / "results.json").write_text(json.dumps(scores))


registry.register("x_src", SrcConfig, "1", f"{__name__}:src_run", outputs={"docs": "docs"})
registry.register("x_tok", SrcConfig, "1", f"{__name__}:tok_run",
                  inputs={"docs": InputSlot("docs")}, outputs={"shards": ""})
registry.register("x_train", TrainConfig, "1", f"{__name__}:train_run",
                  inputs={"data": InputSlot("shards", prefer=("x_tok",)),
                          "init": InputSlot("model", required=False, config_key="init_from", auto=False)},
                  outputs={"model": "model"})
registry.register("x_eval", EvalConfig, "1", f"{__name__}:eval_run",
                  inputs={"models": InputSlot("model", many=True, config_key="models")},
                  outputs={"results": "results.json"})


def _cfg(tmp_path, name="exp", n=3, **stages) -> dict:
    base = {"x_src": {"n": n}, "x_tok": {}, "small": {"type": "x_train"},
            "big": {"type": "x_train", "lr": 2.0}}
    return {"name": name, "workdir": str(tmp_path / "w"), "stages": stages or base}


def test_two_instances_of_one_type_and_evaluate_over_every_model(tmp_path):
    CALLS.clear()
    stages = {"x_src": {}, "x_tok": {}, "small": {"type": "x_train"}, "big": {"type": "x_train", "lr": 2.0},
              "x_eval": {}}
    res = run_pipeline(validate_config(_cfg(tmp_path, **stages)))
    assert CALLS == ["x_src", "x_tok", "small", "big", "x_eval"]
    assert res.stage_dirs["small"] != res.stage_dirs["big"]
    assert Path(res.stage_dirs["small"]).name.startswith("x_train-")
    scores = json.loads((Path(res.stage_dirs["x_eval"]) / "results.json").read_text())
    assert scores == {"small": 30.0, "big": 60.0}  # every model instance, in pipeline order
    run = json.loads((Path(res.run_dir) / "run.json").read_text())
    assert run["stages"]["big"].startswith("store/x_train-")
    assert run["config"]["stages"]["big"]["type"] == "x_train"
    assert run["config"]["stages"]["x_eval"]["inputs"] == {"models": ["small", "big"]}


def test_ambiguous_or_unknown_binding_is_a_config_error_with_the_key(tmp_path):
    stages = {"x_src": {}, "a": {"type": "x_tok"}, "b": {"type": "x_tok"}, "m": {"type": "x_train"}}
    with pytest.raises(ConfigError, match=r"stages\.m\.inputs: .*ambiguous: candidates a, b"):
        validate_config(_cfg(tmp_path, **stages))
    stages["m"]["inputs"] = ["b"]
    nodes = {n.name: n for n in order(validate_config(_cfg(tmp_path, **stages)))}
    assert nodes["m"].bound["data"] == ("b",)
    stages["m"]["inputs"] = ["nope"]
    with pytest.raises(ConfigError, match=r"stages\.m\.inputs: 'nope' is not another stage instance"):
        validate_config(_cfg(tmp_path, **stages))
    stages["m"]["inputs"] = {"data": "x_src"}
    with pytest.raises(ConfigError, match=r"stages\.m\.inputs\.data: 'x_src' \(type x_src\) does not output"):
        validate_config(_cfg(tmp_path, **stages))
    with pytest.raises(ConfigError, match=r"stages\.m\.type: unknown stage type 'x_nope'"):
        validate_config(_cfg(tmp_path, x_src={}, x_tok={}, m={"type": "x_nope"}))


def test_continued_training_starts_from_the_other_instance(tmp_path):
    CALLS.clear()
    stages = {"x_src": {}, "x_tok": {}, "small": {"type": "x_train"},
              "anneal": {"type": "x_train", "init_from": "small", "lr": 0.5},
              "x_eval": {"models": ["anneal"]}}
    cfg = validate_config(_cfg(tmp_path, **stages))
    assert {n.name: n.inputs for n in order(cfg)}["anneal"] == ("x_tok", "small")
    res = run_pipeline(cfg)
    assert float((Path(res.stage_dirs["anneal"]) / "model" / "w.txt").read_text()) == 30.0 + 15.0
    assert json.loads((Path(res.stage_dirs["x_eval"]) / "results.json").read_text()) == {"anneal": 45.0}


def test_renaming_an_instance_keeps_its_store_entry(tmp_path):
    a = {n.name: n.dirname for n in order(validate_config(_cfg(tmp_path)))}
    renamed = {"x_src": {"n": 3}, "x_tok": {}, "tiny": {"type": "x_train"},
               "big": {"type": "x_train", "lr": 2.0}}
    b = {n.name: n.dirname for n in order(validate_config(_cfg(tmp_path, **renamed)))}
    assert a["small"] == b["tiny"] and a["big"] == b["big"]


def test_a_second_run_reuses_the_shared_entries(tmp_path):
    CALLS.clear()
    first = run_pipeline(validate_config(_cfg(tmp_path, name="one")))
    src_status = json.loads((Path(first.stage_dirs["x_src"]) / "status.json").read_text())
    second_cfg = _cfg(tmp_path, name="two")
    second_cfg["stages"]["big"]["lr"] = 3.0
    CALLS.clear()
    second = run_pipeline(validate_config(second_cfg))
    assert CALLS == ["big"]  # x_src, x_tok and small were made by run one
    assert second.outcomes == {"x_src": "reused", "x_tok": "reused", "small": "reused", "big": "ran"}
    assert json.loads((Path(second.stage_dirs["x_src"]) / "status.json").read_text()) == src_status
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("two").experiment_id
    runs = {r.data.tags["seedline.stage"]: r for r in client.search_runs([exp], "tags.seedline.stage != ''")}
    assert runs["x_tok"].data.tags["seedline.reused_from"] == first.run_dir
    assert runs["x_tok"].data.tags["seedline.reused_mlflow_run_id"]
    assert "seedline.reused" not in runs["big"].data.tags
    out = subprocess.run([sys.executable, "-m", "pipeline", "status", second.run_dir, "--json"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    rows = {r["stage"]: r for r in json.loads(out.stdout)}
    assert rows["x_tok"]["made_by"] == first.run_dir and rows["big"]["made_by"] == second.run_dir


def test_gc_lists_and_removes_exactly_the_unreferenced_entries(tmp_path):
    workdir = str(tmp_path / "w")
    old = run_pipeline(validate_config(_cfg(tmp_path, n=3)))
    new = run_pipeline(validate_config(_cfg(tmp_path, n=4)))  # same run name: run.json now points at new
    stale = sorted({old.stage_dirs[k] for k in old.stage_dirs} - set(new.stage_dirs.values()))
    assert len(stale) == 4
    assert unreferenced(workdir) == stale
    out = subprocess.run([sys.executable, "-m", "pipeline", "gc", workdir, "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert sorted(re.findall(r"would remove (\S+)", out)) == stale and "4 unreferenced" in out
    assert all(Path(d).exists() for d in stale)
    assert collect(workdir) == stale
    assert not any(Path(d).exists() for d in stale) and all(Path(d).exists() for d in new.stage_dirs.values())


def test_plan_explains_reuse_run_and_changed_keys(tmp_path):
    run_pipeline(validate_config(_cfg(tmp_path, name="one")))
    conf = tmp_path / "two.yaml"
    data = _cfg(tmp_path, name="two")
    data["stages"]["big"]["lr"] = 5.0
    conf.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(conf)], cwd=REPO, capture_output=True,
                         text=True, check=True, env=ENV).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert re.search(r"reuse .*made by run .*/w/one", lines["x_tok"])
    assert " run " in lines["big"] and "new config" in lines["big"]
    run_pipeline(validate_config(data))
    data["stages"]["big"]["lr"] = 6.0
    conf.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(conf)], cwd=REPO, capture_output=True,
                         text=True, check=True, env=ENV).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "changed: stages.big.lr" in lines["big"] and lines["small"].split()[1] == "reuse"


def test_no_stage_reads_another_stage_by_path():
    """Consumers get typed handles (ctx.input); only a stage's own package knows its file layout."""
    offenders = []
    for path in sorted((REPO / "stages").rglob("*.py")):
        src = path.read_text()
        for pattern in (r"ctx\.upstream", r"(?<!ctx)(?<!self)\.out_dir\b", r"\bUpstream\("):
            if re.search(pattern, src):
                offenders.append(f"{path.relative_to(REPO)}: {pattern}")
        pkg = path.relative_to(REPO / "stages").parts[0]
        for other, spec in registry.registry().items():
            if other == pkg:
                continue
            for rel in spec.outputs.values():
                if "/" in rel and rel in src:
                    offenders.append(f"{path.relative_to(REPO)}: {other}'s {rel}")
    assert offenders == []


def test_the_core_imports_no_stage_and_no_cluster_module():
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        src = path.read_text()
        assert not re.search(r"^\s*(from|import) (stages|cluster)\b", src, re.M), path


class SlowConfig(StrictModel):
    lr: float = 1.0
    together: str | None = None  # a directory: wait there until 2 runs of this stage have started


def slow_train_run(config: SlowConfig, ctx) -> None:
    """A training stand-in that logs a loss curve; with ``together`` it first waits until two of its runs
    are under way (a barrier, not a sleep: variants that run one after the other fail it, whatever the
    machine's load)."""
    import time

    CALLS.append(ctx.name)
    data = int((Path(ctx.input("data").path) / "shards.txt").read_text())
    if config.together:
        here = Path(config.together)
        here.mkdir(parents=True, exist_ok=True)
        (here / f"{config.lr}").touch()
        deadline = time.monotonic() + 120
        while len(list(here.iterdir())) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the other variant did not start while this one ran")
            time.sleep(0.05)
    lines = [json.dumps({"step": s, "loss": data / (s * config.lr), "tokens": 100 * s}) for s in (1, 2, 3)]
    (Path(ctx.out_dir) / "metrics.jsonl").write_text("\n".join(lines) + "\n")


registry.register("x_slow", SlowConfig, "1", f"{__name__}:slow_train_run",
                  inputs={"data": InputSlot("shards", prefer=("x_tok",))},
                  outputs={"model": "", "metrics": "metrics.jsonl"})


def _status(d: str) -> dict:
    return json.loads((Path(d) / "status.json").read_text())


def test_a_sweep_runs_the_shared_stages_once_and_the_variants_at_the_same_time(tmp_path):
    conf = tmp_path / "sweep.yaml"
    conf.write_text(yaml.safe_dump({
        "name": "sw", "workdir": str(tmp_path / "w"),
        "stages": {"x_src": {}, "x_tok": {}, "train": {"type": "x_slow", "together": str(tmp_path / "both")}},
        "sweep": {"stages.train.lr": [1.0, 2.0]}}))
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", str(conf), "--max-parallel", "2"],
                         cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "w" / "sw" / "sweep.json").read_text())
    assert [v["name"] for v in index["variants"]] == ["sw.lr1.0", "sw.lr2.0"]
    a, b = (json.loads((Path(v["run_dir"]) / "run.json").read_text()) for v in index["variants"])
    assert a["stages"]["x_tok"] == b["stages"]["x_tok"] and a["stages"]["train"] != b["stages"]["train"]
    runs = [Path(v["run_dir"]) for v in index["variants"]]
    # The shared stages ran once (one driver ran each, the other waited or reused it).
    for shared in ("x_src", "x_tok"):
        assert out.stderr.count(f"{shared}: running in {shared}-") == 1
    train = [_status(str(r.parent / a["stages"]["train"])) for r in runs[:1]]
    train.append(_status(str(runs[1].parent / b["stages"]["train"])))
    # The two variants' training overlapped in time (each waited for the other to start).
    assert train[0]["started"] < train[1]["finished"] and train[1]["started"] < train[0]["finished"]
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["1.0", "2.0"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sw").experiment_id
    parents = client.search_runs([exp], "tags.seedline.sweep = 'sw'")
    assert sorted(p.data.tags["seedline.sweep.stages.train.lr"] for p in parents) == ["1.0", "2.0"]
    shown = subprocess.run([sys.executable, "-m", "pipeline", "compare", str(tmp_path / "w" / "sw")],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "sw.lr1.0" in shown and "sw.lr2.0" in shown and "train/loss" in shown
    rows = json.loads(subprocess.run([sys.executable, "-m", "pipeline", "compare", str(tmp_path / "w" / "sw"),
                                      "--json"], cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert [r["metrics"]["train/loss"] for r in rows] == [10.0, 5.0]
    assert [r["values"]["stages.train.lr"] for r in rows] == [1.0, 2.0]
    page = subprocess.run([sys.executable, "-m", "pipeline", "report", str(tmp_path / "w" / "sw")], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.strip()
    html = Path(page).read_text()
    assert "Seedline sweep" in html and html.count("data:image/png;base64") == 1  # one shared-axes chart


def test_a_bad_sweep_is_a_config_error(tmp_path):
    conf = tmp_path / "sweep.yaml"
    conf.write_text(yaml.safe_dump({"name": "sw", "workdir": str(tmp_path / "w"),
                                    "stages": {"x_src": {}, "x_tok": {}, "train": {"type": "x_slow"}},
                                    "sweep": {"stages.train.lr": "fast"}}))
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", str(conf)], cwd=REPO, capture_output=True,
                         text=True, env=ENV)
    assert out.returncode == 2 and "sweep.stages.train.lr" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", str(conf), "--sweep",
                          "stages.train.lr=1,x"], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert out.returncode == 2 and "stages.train.lr" in out.stderr and "Traceback" not in out.stderr


def test_mlflow_holds_configs_outputs_inputs_and_a_summary(tmp_path):
    stages = {"x_src": {}, "x_tok": {}, "train": {"type": "x_slow"}}
    cfg = validate_config(_cfg(tmp_path, name="ml", **stages))
    res = run_pipeline(cfg)
    client = MlflowClient(cfg.tracking_uri())
    run_json = json.loads((Path(res.run_dir) / "run.json").read_text())
    parent = client.get_run(run_json["mlflow_parent_run_id"])
    assert parent.info.run_name == "ml" and run_json["attempts"] == 1
    assert "pipeline.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["train/loss"] == 10.0 and "wall_s" in parent.data.metrics
    exp = parent.info.experiment_id
    children = {r.data.tags["seedline.stage"]: r
                for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    train = children["train"]
    assert {a.path for a in client.list_artifacts(train.info.run_id)} >= {"config.json", "outputs"}
    [dataset] = train.inputs.dataset_inputs
    tok = order(cfg)[1]
    assert dataset.dataset.name == "x_tok.shards" and dataset.dataset.digest == tok.fingerprint
    # A second attempt (here: a forced re-run of one stage) gets its own name on the same parent run.
    run_pipeline(cfg, from_stage="train")
    assert client.get_run(parent.info.run_id).info.run_name == "ml (attempt 2)"


def test_run_ends_with_a_summary_and_the_next_commands(tmp_path):
    conf = tmp_path / "c.yaml"
    data = _cfg(tmp_path, name="sum", x_src={"n": 2}, x_tok={}, m={"type": "x_train"})
    conf.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", str(conf)], cwd=REPO, capture_output=True,
                         text=True, env=ENV, check=True)
    run_dir = out.stdout.strip().splitlines()[-1]
    tail = out.stderr[out.stderr.index(f"run {run_dir}:"):].splitlines()
    assert [line.split()[:2] for line in tail[1:4]] == [["x_src", "ran"], ["x_tok", "ran"], ["m", "ran"]]
    assert f"seedline ui {run_dir}" in out.stderr and f"seedline report {run_dir}" in out.stderr
    assert "from_pretrained" not in out.stderr  # no stage exported a Hugging Face model


def test_decontamination_against_the_pipelines_eval_data_is_part_of_the_fingerprint(tmp_path):
    def fp(task_path: str) -> str:
        cfg = validate_config({"name": "d", "workdir": str(tmp_path / "w"), "stages": {
            "filter": {"input": "x.jsonl", "decontaminate": {}},
            "tokenize": {}, "pretrain": {},
            "evaluate": {"tasks": [{"name": "mc", "path": task_path}]}}})
        return {n.name: n.fingerprint for n in order(cfg)}["filter"]

    assert fp("a.jsonl") != fp("b.jsonl")  # other evaluation data: the filter runs again
