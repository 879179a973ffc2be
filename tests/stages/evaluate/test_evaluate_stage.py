"""The evaluate stage end to end on real tiny models: real tokenize output, Ray tasks, MLflow SQLite registry.

Every number is checked against an independent computation with ``transformers``' ``LlamaForCausalLM``
loaded from the exported model directories.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import (
    context,
    documents,
    export_stage,
    mc_examples,
    tiny_model,
    train_a_little,
    write_corpus,
    write_dpo_pairs,
    write_mc_task,
    write_sft_val,
)

from pipeline.stage import handle
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.run import run
from stages.lm.data import PackedDataset
from stages.tokenize.config import TokenizeConfig

BETA = 0.5
PAIRS = [
    ("What does json.dumps do?", "Serialize an object to a JSON string.", "Return the list of lines."),
    ("What does os.getcwd do?", "Return the current working directory.", "Open a file for reading."),
    ("What does len do?", "Return the number of items in a container.", "Sleep for some seconds."),
    ("Summarise str.split.", "Split a string into a list of words.", "Compute a hash of the data."),
]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from pipeline.ray_init import init_ray

    init_ray(None, 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session):
    """tokenize (real stage) -> pretrain (trained a little), sft, dpo (random) -> evaluate, with MLflow."""
    from mlflow.tracking import MlflowClient
    from tokenizers import Tokenizer

    from pipeline.tracking import PipelineTracking
    from stages.tokenize.run import run as tokenize_run

    root = tmp_path_factory.mktemp("evaluate")
    corpus = write_corpus(root / "corpus.jsonl", documents(120))
    tok_cfg = TokenizeConfig(
        input=str(corpus),
        id_field="id",
        seq_len=48,
        val_fraction=0.25,
        rows_per_shard=4,
        tokenizer={"train": {"vocab_size": 320, "sample_docs": 120}},
    )
    tok_dir = root / "tokenize"
    tokenize_run(tok_cfg, context(tok_dir, root, {}))
    manifest = json.loads((tok_dir / "manifest.json").read_text())
    vocab = manifest["vocab_size"]
    models = {
        "pretrain": train_a_little(tiny_model(vocab, 0), tok_dir, 40),
        "sft": tiny_model(vocab, 1),
        "dpo": tiny_model(vocab, 2),
    }
    for stage, model in models.items():
        export_stage(root, stage, model, tok_dir / "tokenizer")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer" / "tokenizer.json"))
    write_dpo_pairs(root / "dpo", tok, PAIRS)
    write_sft_val(root / "sft", tok.to_str(), PAIRS, max_len=140)  # 2 examples per row
    mc = write_mc_task(
        root / "mc.jsonl",
        mc_examples(6),
        bad_lines=['{"context": "x", "choices": [" a"], "gold": 0}', "not json"],
    )
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p, _, _ in PAIRS[:3]) + "\n{}\n")

    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("evaltest", artifact_location=str(root / "artifacts"))
    tracking = PipelineTracking(uri, "evaltest")
    parent = tracking.parent(None, "evaltest", {})
    tracker = tracking.child(parent, None, "evaluate", {})
    tok_config = tok_cfg.model_dump(mode="json")
    upstream = {"data": [handle("tokenize", str(tok_dir), "shards", fingerprint="tokfp", config=tok_config)],
                "tokenizer": [handle("tokenize", str(tok_dir), "tokenizer", fingerprint="tokfp")],
                "models": [handle(s, str(root / s), "model", fingerprint=f"{s}fp") for s in models]}
    if "dpo" in models:
        dpo = {"fingerprint": "dpofp", "config": {"beta": BETA},
               "inputs": {"model": ("sft",)} if "sft" in models else {}}
        upstream["pairs"] = [handle("dpo", str(root / "dpo"), "preference_pairs", **dpo)]
        upstream["reference"] = [handle("dpo", str(root / "dpo"), "reference_logps", **dpo)]
    if "sft" in models:
        upstream["answers"] = [handle("sft", str(root / "sft"), "instruction_val", fingerprint="sftfp")]
    config = EvaluateConfig(
        perplexity={"enabled": True, "batches": 0},
        tasks=[
            {"name": "mc", "path": str(mc)},
            {"name": "mc3", "path": str(mc), "num_fewshot": 2, "limit": 4},
        ],
        prompts=str(prompts),
        max_new_tokens=6,
        batch_size=3,
        registry={"name": "tiny-lm", "metric": "perplexity", "mode": "min"},
    )
    ctx = context(root / "out", root, upstream, tracker)
    results = run(config, ctx)
    tracker.close("FINISHED")
    return {
        "root": root,
        "out": root / "out",
        "tok_dir": tok_dir,
        "results": results,
        "config": config,
        "ctx": ctx,
        "uri": uri,
        "tok": tok,
        "mc": mc,
        "upstream": upstream,
        "tracker": tracker,
    }


def _hf(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1,) log p(ids[t] | ids[:t]) for t >= 1, computed with transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_results_cover_every_model_and_metric(setup):
    results = setup["results"]
    assert list(results["models"]) == ["pretrain", "sft", "dpo"]
    for stage, m in results["models"].items():
        for key in (
            "loss",
            "perplexity",
            "bits_per_byte",
            "mc/acc",
            "mc/acc_norm",
            "mc3/acc",
            "mc3/acc_norm",
            "pref_logp_accuracy",
            "answer_loss",
        ):
            assert key in m and math.isfinite(m[key]), (stage, key)
    assert set(results["models"]["dpo"]) >= {"pref_accuracy", "pref_margin"}
    assert "pref_accuracy" not in results["models"]["sft"]
    # the model trained a little beats the random ones
    assert results["models"]["pretrain"]["perplexity"] < results["models"]["sft"]["perplexity"]
    # quarantined, counted, with reasons; nothing bad is fatal
    assert results["rejects"] == {"mc": 2, "mc3": 2, "prompts": 1}
    rejects = [json.loads(x) for x in (setup["out"] / "rejects" / "mc.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [7, 8] and "at least two" in rejects[0]["reason"]
    assert results["counts"]["tasks"] == {"mc": 6, "mc3": 4}
    # every accuracy with its chance level (4 choices) and sample size, in results.json and results.md
    assert results["baselines"]["mc/acc"] == {"chance": 0.25, "n": 6}
    assert results["baselines"]["mc3/acc_norm"] == {"chance": 0.25, "n": 4}
    assert results["baselines"]["pref_accuracy"]["chance"] == 0.5
    md = (setup["out"] / "results.md").read_text()
    assert "| metric | pretrain | sft | dpo |" in md and "tiny-lm@candidate" in md
    assert "| mc/acc_norm ↑ (chance 0.25, n 6) |" in md and "| loss ↓ |" in md
    assert f"| answer_loss ↓ (n {len(PAIRS)}) |" in md and results["counts"]["answer_examples"] == len(PAIRS)


def test_perplexity_and_bits_per_byte_equal_a_direct_computation(setup):
    tok, tok_dir = setup["tok"], setup["tok_dir"]
    data = PackedDataset(tok_dir, "val")
    special = set(data.special_token_ids.values())
    # The val stream, rebuilt from the rows (they overlap by one token), decoded into its documents.
    stream: list[int] = []
    for i in range(len(data)):
        row, n, _ = data.row(i)
        stream += [int(t) for t in row[:n]][(1 if stream else 0) :]
    eot = data.special_token_ids["eot"]
    docs = tok.decode(stream, skip_special_tokens=False).split("<|endoftext|>")[:-1]
    text_bytes = sum(len(d.encode("utf-8")) for d in docs) - len(tok.decode(stream[:1]).encode("utf-8"))
    assert any(len(d.encode()) != len(d) for d in docs)  # multi-byte characters are in the split

    for stage in ("pretrain", "dpo"):
        hf = _hf(setup["root"] / stage / "model")
        nll, n, nll_text = 0.0, 0, 0.0
        for i in range(len(data)):  # each document segment of each row on its own, positions from 0
            row, length, starts = data.row(i)
            bounds = sorted({0, *[int(s) for s in starts]}) + [length - 1]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                if b <= a:
                    continue
                lp = _logprobs(hf, [int(t) for t in row[a : b + 1]])
                targets = [int(t) for t in row[a + 1 : b + 1]]
                nll -= float(lp.sum())
                n += len(targets)
                nll_text -= float(
                    sum(v for v, t in zip(lp.tolist(), targets, strict=True) if t not in special)
                )
        got = setup["results"]["models"][stage]
        assert n == len(stream) - 1 and stream.count(eot) == len(docs)
        assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(nll_text / text_bytes / math.log(2), rel=1e-5)
    assert setup["results"]["counts"]["perplexity"]["bytes"] == text_bytes


def test_multiple_choice_matches_a_direct_computation(setup):
    from stages.evaluate.multiple_choice import encode_pair, fewshot_context, load_task

    task = setup["config"].tasks[1]
    examples, _ = load_task(task)
    for stage, chat in (("pretrain", False), ("sft", True)):  # sft is a chat model: asked in ChatML
        hf = _hf(setup["root"] / stage / "model")
        for t in setup["config"].tasks:
            acc = acc_norm = 0
            scored = examples[: t.limit] if t.limit else examples
            for i, ex in enumerate(scored):
                ctx = fewshot_context(examples, i, t.num_fewshot, t.seed)
                lls = []
                for choice in ex.choices:
                    c, k = encode_pair(setup["tok"], ctx, choice, chat)
                    lls.append(float(_logprobs(hf, c + k)[-len(k) :].sum()))
                acc += int(np.argmax(lls) == ex.gold)
                acc_norm += int(
                    np.argmax([ll / len(ch) for ll, ch in zip(lls, ex.choices, strict=True)]) == ex.gold
                )
            got = setup["results"]["models"][stage]
            assert got[f"{t.name}/acc"] == pytest.approx(acc / len(scored))
            assert got[f"{t.name}/acc_norm"] == pytest.approx(acc_norm / len(scored))


def test_preference_metrics_match_a_direct_computation(setup):
    from stages.evaluate.preference import load_requests

    reqs = load_requests(str(setup["root"] / "dpo" / "pairs" / "val.arrow"), None)
    logps = {}
    for stage in ("sft", "dpo"):
        hf = _hf(setup["root"] / stage / "model")
        logps[stage] = np.array(
            [float((_logprobs(hf, ids) * torch.tensor(mask[1:])).sum()) for ids, mask in reqs]
        )
    reward = BETA * (logps["dpo"] - logps["sft"]).reshape(-1, 2)
    got = setup["results"]["models"]
    assert got["dpo"]["pref_accuracy"] == pytest.approx(float(np.mean(reward[:, 0] > reward[:, 1])))
    assert got["dpo"]["pref_margin"] == pytest.approx(float(np.mean(reward[:, 0] - reward[:, 1])), rel=1e-5)
    sft = logps["sft"].reshape(-1, 2)
    assert got["sft"]["pref_logp_accuracy"] == pytest.approx(float(np.mean(sft[:, 0] > sft[:, 1])))


def test_answer_loss_is_the_sft_val_answers_loss_computed_with_transformers(setup):
    """Every model's held-out answer loss: the sft split's examples unpacked from their rows, each scored
    alone, mean over the assistant tokens sft trains on."""
    from stages.sft.data import SFTDataset

    val = SFTDataset(str(setup["root"] / "sft" / "data" / "val.arrow"), 140, 0, "val")
    examples = []
    for r in range(len(val)):
        tokens, mask, lengths = val.row(r)
        for a, n in zip(np.cumsum([0, *lengths[:-1]]), lengths, strict=True):
            examples.append((tokens[a:a + n].tolist(), mask[a:a + n]))
    assert len(val) < len(examples) == len(PAIRS)  # packed: several examples per row
    for stage in ("pretrain", "sft", "dpo"):
        hf = _hf(setup["root"] / stage / "model")
        nll = tokens = 0.0
        for ids, mask in examples:
            nll -= float((_logprobs(hf, ids) * torch.tensor(mask[1:])).sum())
            tokens += int(mask[1:].sum())
        got = setup["results"]["models"][stage]["answer_loss"]
        assert got == pytest.approx(nll / tokens, rel=1e-5), stage


def test_generations_are_greedy_and_saved(setup):
    lines = [json.loads(x) for x in (setup["out"] / "generations.jsonl").read_text().splitlines()]
    assert [(g["model"], g["index"]) for g in lines] == [
        (s, i) for s in ("pretrain", "sft", "dpo") for i in range(3)
    ]
    assert [g["chat"] for g in lines[::3]] == [False, True, True]
    hf = _hf(setup["root"] / "pretrain" / "model")
    ids = setup["tok"].encode(lines[0]["prompt"], add_special_tokens=False).ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=lines[0]["tokens"], do_sample=False)
    assert (
        setup["tok"].decode(out[0, len(ids) :].tolist(), skip_special_tokens=False) == lines[0]["generation"]
    )


def test_charts_are_pngs_of_every_metric(setup):
    charts = sorted(p.name for p in (setup["out"] / "charts").iterdir())
    assert {
        "perplexity.png",
        "bits_per_byte.png",
        "mc_acc.png",
        "mc_acc_norm.png",
        "pref_accuracy.png",
    } <= set(charts)
    assert all((setup["out"] / "charts" / c).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for c in charts)


def test_best_model_is_registered_with_alias_and_lineage_and_loads_back(setup):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from stages.lm.hf import import_hf

    reg = setup["results"]["registered"]
    assert reg["stage"] == "pretrain" and reg["alias"] == "candidate"  # lowest perplexity
    client = MlflowClient(tracking_uri=setup["uri"], registry_uri=setup["uri"])
    version = client.get_model_version_by_alias("tiny-lm", "candidate")
    assert int(version.version) == reg["version"]
    assert "best of 3 by perplexity" in version.description and reg["why"] in version.description
    manifest = json.loads((setup["tok_dir"] / "manifest.json").read_text())
    tags = version.tags
    assert tags["seedline.stage"] == "pretrain" and tags["seedline.metric"] == "perplexity"
    assert tags["seedline.run_dir"] == str(setup["root"])
    assert tags["seedline.tokenizer_sha256"] == manifest["tokenizer_sha256"]
    assert tags["seedline.fingerprint.tokenize"] == "tokfp" and tags["seedline.fingerprint.dpo"] == "dpofp"
    assert version.run_id == setup["tracker"].run_id
    run = client.get_run(setup["tracker"].run_id)
    # One nested run per model, with the same metric names: MLflow's compare view puts them side by side.
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    by_model = {r.data.tags["seedline.model"]: r for r in nested}
    assert set(by_model) == set(setup["results"]["models"])
    assert by_model["pretrain"].data.metrics["perplexity"] == pytest.approx(
        setup["results"]["models"]["pretrain"]["perplexity"]
    )
    assert by_model["sft"].data.metrics.keys() == by_model["pretrain"].data.metrics.keys()
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "charts")}
    assert "charts/perplexity.png" in arts

    mlflow.set_registry_uri(setup["uri"])
    mlflow.set_tracking_uri(setup["uri"])
    loaded = mlflow.pyfunc.load_model("models:/tiny-lm@candidate")
    out = loaded.predict(["Doc 3: the quick"], params={"max_new_tokens": 5})
    assert len(out) == 1 and isinstance(out[0], str) and out[0]
    lm = loaded.unwrap_python_model()
    ref = import_hf(str(setup["root"] / "pretrain" / "model"))
    ids = setup["tok"].encode("Doc 3: the quick brown fox", add_special_tokens=False).ids
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(lm.logits("Doc 3: the quick brown fox"), want)
    prompt = setup["tok"].encode("Doc 3: the quick", add_special_tokens=False).ids
    stops = [setup["tok"].token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    new = [t for t in ref.generate([prompt], 5, stop_tokens=stops)[0] if t not in stops]
    assert out[0] == setup["tok"].decode(new)


def test_the_reports_verdict_names_the_model_results_json_registered_and_why(setup):
    import html
    import re

    from pipeline.report import write_report

    root = setup["root"]
    run_json = {"config": {"name": "evaltest"}, "stages": {"evaluate": "out"}, "order": ["evaluate"]}
    (root / "run.json").write_text(json.dumps(run_json))
    status = setup["out"] / "status.json"  # what the runner writes when the stage ends
    if not status.exists():
        status.write_text(json.dumps({"state": "succeeded", "stage": "evaluate", "type": "evaluate"}))
    page = Path(write_report(str(root))).read_text()
    section = page[page.index("<h2>Verdict</h2>"):page.index("</div>", page.index('<div class="verdict">'))]
    results = json.loads((setup["out"] / "results.json").read_text())
    reg = results["registered"]
    cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", section)]
    assert cells[:2] == ["evaluate", f"registered {reg['stage']}"]
    assert reg["why"] in cells and reg["why"].startswith("best of 3 by perplexity")
    best = min(results["models"], key=lambda m: results["models"][m]["perplexity"])
    assert reg["stage"] == best


def test_resume_finishes_with_identical_outputs_and_one_registration(setup):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import Tracker

    out = setup["out"]
    before = {p: (out / p).read_bytes() for p in ("results.json", "results.md", "generations.jsonl")}
    # A kill after the first model and before the end: its marker and the final outputs are gone.
    (out / "results.json").unlink()
    (out / "models" / "sft.json").unlink()
    (out / "generations.jsonl").unlink()
    shutil.rmtree(out / "charts")
    tracker = Tracker(setup["uri"], setup["tracker"].run_id)
    ctx = context(out, setup["root"], setup["upstream"], tracker)
    run(setup["config"], ctx)
    tracker.close()
    assert {p: (out / p).read_bytes() for p in before} == before
    client = MlflowClient(tracking_uri=setup["uri"], registry_uri=setup["uri"])
    assert len(client.search_model_versions("name='tiny-lm'")) == 1


def test_hand_computed_acc_and_acc_norm():
    from stages.evaluate.multiple_choice import Example, task_metrics

    examples = [
        Example("Q1", (" a", " bbbb", " cc"), 1),  # ll -1.0 -2.0 -1.5; per char -0.5 -0.4 -0.5
        Example("Q2", (" xx", " y"), 0),
    ]  # ll -3.0 -2.0;      per char -1.0 -1.0 (tie -> first)
    got = task_metrics("t", examples, [-1.0, -2.0, -1.5, -3.0, -2.0], None)
    # acc: Q1 argmax is choice 0 (wrong), Q2 argmax is choice 1 (wrong) -> 0/2
    # acc_norm: Q1 argmax is choice 1 (right), Q2 tie goes to choice 0 (right) -> 2/2
    assert got == {"t/acc": 0.0, "t/acc_norm": 1.0}


def test_perplexity_without_document_masks_attends_across_documents(setup):
    from stages.evaluate.perplexity import evaluate_perplexity, token_bytes
    from stages.lm.hf import import_hf

    data = PackedDataset(setup["tok_dir"], "val")
    model = import_hf(str(setup["root"] / "pretrain" / "model"))
    tb = token_bytes((setup["tok_dir"] / "tokenizer" / "tokenizer.json").read_text(), data.vocab_size)
    got, counts = evaluate_perplexity(model, data, tb, 2, 0, torch.device("cpu"), doc_mask=False)
    hf = _hf(setup["root"] / "pretrain" / "model")
    batch = data.batch(list(range(len(data))))  # whole rows, positions restarting at document starts
    with torch.no_grad():
        logits = hf(batch["input_ids"], position_ids=batch["position_ids"]).logits.double()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    assert got["loss"] == pytest.approx(float(nll) / counts["tokens"], rel=1e-5)
    masked = setup["results"]["models"]["pretrain"]["loss"]
    assert got["loss"] != pytest.approx(masked, rel=1e-6)  # the context differs, so does the loss
