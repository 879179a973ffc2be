"""The pre-flight: every mistake the issue found escaping as a traceback, an exit 1, or an error minutes
into a run is one line naming the key path or the file, exit 2, before anything starts (no run
directory, no tracking store, no Ray)."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from tests.pipeline.preflight_helpers import (
    assert_config_error,
    make_project,
    model_dir,
    seedline,
    tiny,
)


def _plan(*args: str):
    res = CliRunner().invoke(app, ["plan", *args])
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def _write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_valid_project_passes(tmp_path, monkeypatch):
    cfg = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out = _plan(str(cfg))
    assert code == 0, out
    assert [ln.split()[1] for ln in out.splitlines()] == ["run"] * 6
    assert not (tmp_path / "runs").exists(), "plan creates nothing"


@pytest.mark.parametrize("stage, key, glob", [
    ("dedupe", "input", "demo-data/corpus/*.parquet"),
    ("sft", "data", "demo-data/instruct/nothing-*.jsonl"),
    ("sft", "val", "demo-data/instruct/missing.jsonl"),
    ("dpo", "data", ["demo-data/prefs/train.jsonl", "demo-data/prefs/gone/*.jsonl"]),
    ("dpo", "val", "demo-data/prefs/val.json"),
])
def test_input_glob_that_matches_nothing(tmp_path, monkeypatch, stage, key, glob):
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    data = tiny()
    data["workdir"] = str(tmp_path / "runs")
    data["stages"][stage][key] = glob
    code, out = _plan(str(_write(tmp_path, data)))
    line = assert_config_error(code, out, f"stages.{stage}.{key}")
    assert "no input file matches" in line


def test_glob_matching_only_directories(tmp_path, monkeypatch):
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    data = tiny()
    data["workdir"] = str(tmp_path / "runs")
    data["stages"]["dedupe"]["input"] = "demo-data/*"
    code, out = _plan(str(_write(tmp_path, data)))
    assert "only directories" in assert_config_error(code, out, "stages.dedupe.input")


def _sft_from(tmp_path, init_from):
    data = tiny()
    data["workdir"] = str(tmp_path / "runs")
    for s in ("pretrain", "dpo", "evaluate"):
        data["stages"].pop(s)
    data["stages"]["sft"]["init_from"] = str(init_from)
    return _write(tmp_path, data)


@pytest.mark.parametrize("shape, says", [
    ("missing", "does not exist"),
    ("no-config", "no config.json"),
    ("no-weights", "no model.safetensors"),
    ("bad-config", "not a valid model config"),
    ("a-file", "no config.json"),
])
def test_init_from_must_be_a_model_directory(tmp_path, monkeypatch, shape, says):
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "model"
    if shape == "no-config":
        model_dir(target, config=False)
    elif shape == "no-weights":
        model_dir(target, weights=False)
    elif shape == "bad-config":
        model_dir(target)
        (target / "config.json").write_bytes(b"{not json")
    elif shape == "a-file":
        target.write_text("weights?")
    code, out = _plan(str(_sft_from(tmp_path, target)))
    assert says in assert_config_error(code, out, "stages.sft.init_from")


def test_init_from_a_real_model_directory_passes(tmp_path, monkeypatch):
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out = _plan(str(_sft_from(tmp_path, model_dir(tmp_path / "model"))))
    assert code == 0, out


@pytest.mark.parametrize("mutate, key", [
    (lambda d, t: d["stages"]["evaluate"]["tasks"][0].update(path="demo-data/eval/none.jsonl"),
     "stages.evaluate.tasks.0.path"),
    (lambda d, t: d["stages"]["evaluate"]["tasks"][0].update(path="demo-data/eval"),
     "stages.evaluate.tasks.0.path"),
    (lambda d, t: d["stages"]["evaluate"].update(prompts="demo-data/eval/nope.jsonl"),
     "stages.evaluate.prompts"),
    (lambda d, t: d["stages"]["tokenize"].update(tokenizer={"path": "demo-data/eval"}),
     "stages.tokenize.tokenizer.path"),
])
def test_files_named_by_stages_exist(tmp_path, monkeypatch, mutate, key):
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    data = tiny()
    data["workdir"] = str(tmp_path / "runs")
    mutate(data, tmp_path)
    code, out = _plan(str(_write(tmp_path, data)))
    assert_config_error(code, out, key)


@pytest.mark.parametrize("where", ["workdir-is-file", "under-a-file", "run-dir-is-file"])
def test_workdir_must_be_a_directory_or_creatable(tmp_path, monkeypatch, where):
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    data = tiny()
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file")
    if where == "workdir-is-file":
        data["workdir"] = str(blocker)
    elif where == "under-a-file":
        data["workdir"] = str(blocker / "runs")
    else:
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / data["name"]).write_text("a file where the run directory goes")
        data["workdir"] = str(tmp_path / "w")
    code, out = _plan(str(_write(tmp_path, data)))
    assert_config_error(code, out, "workdir", "name:")


def test_corrupt_status_json_names_the_file(tmp_path, monkeypatch):
    cfg = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out = _plan(str(cfg))
    dirname = out.splitlines()[0].split()[2]
    from pipeline.config import load_config
    from pipeline.state import RunState

    sdir = tmp_path / RunState(load_config(cfg).run_dir()).stage_dir(dirname)
    sdir.mkdir(parents=True)
    (sdir / "status.json").write_text('{"state": "runn')
    code, out = _plan(str(cfg))
    assert "corrupt" in assert_config_error(code, out, "status.json")


# Real processes: the tracebacks, each now one line and exit 2.

def test_config_path_that_is_a_directory(tmp_path):
    res = seedline("run", str(tmp_path), cwd=tmp_path)
    assert_config_error(res.returncode, res.stderr, str(tmp_path))


def test_config_that_is_not_utf8(tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("name: caf\u00e9\nworkdir: runs\n".encode("latin-1"))
    res = seedline("plan", str(cfg), cwd=tmp_path)
    assert "UTF-8" in assert_config_error(res.returncode, res.stderr, "latin1.yaml")


def test_workdir_pointing_at_a_file_in_run(tmp_path):
    cfg = make_project(tmp_path)
    (tmp_path / "afile").write_text("x")
    res = seedline("run", str(cfg), "-s", f"workdir={tmp_path / 'afile'}", cwd=tmp_path)
    assert_config_error(res.returncode, res.stderr, "workdir")
    assert "Ray" not in res.stderr and not (tmp_path / "afile.d").exists()


def test_glob_matching_nothing_fails_run_before_ray_starts(tmp_path):
    cfg = make_project(tmp_path)
    res = seedline("run", str(cfg), "-s", "stages.dedupe.input=nowhere/*.jsonl", cwd=tmp_path)
    assert_config_error(res.returncode, res.stderr, "stages.dedupe.input")
    assert not (tmp_path / "runs").exists(), "nothing was created: the run never started"


@pytest.mark.parametrize("command", ["status", "resume", "report"])
def test_corrupt_run_json_is_one_line_naming_it(tmp_path, command):
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_bytes(b'{"config": {"name": "tiny", "stages": {')
    res = seedline(command, str(run_dir), cwd=tmp_path)
    assert "corrupt" in assert_config_error(res.returncode, res.stderr, str(run_dir / "run.json"))


def test_run_json_that_is_not_a_record(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps([1, 2, 3]))
    res = seedline("resume", str(run_dir), cwd=tmp_path)
    assert_config_error(res.returncode, res.stderr, "run.json")


def test_submit_runs_the_preflight_before_contacting_the_cluster(tmp_path):
    cfg = make_project(tmp_path)
    # Port 9 on loopback: nothing listens; the pre-flight must refuse before any connection is tried.
    res = seedline("submit", str(cfg), "--address", "http://127.0.0.1:9", "-s",
                   "stages.sft.data=demo-data/none/*.jsonl", cwd=tmp_path)
    line = assert_config_error(res.returncode, res.stderr, "stages.sft.data")
    assert "no input file matches" in line
