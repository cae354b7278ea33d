"""tools/evaluate.py on a Hugging Face export (a random SOLO export; real photos cut from scikit-learn's
sample images): the four kinds of task in one run of the tool, per-sample JSONL, summary and table,
skips counted by reason; batched answers equal one-at-a-time answers; bad input is one error: line."""

import json
import os
import subprocess
import sys

import pytest
import sklearn
import torch
from PIL import Image

from megatron_solo.eval import metrics as M
from megatron_solo.eval import tasks as T
from tests.conftest import ROOT

PHOTOS = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.helpers_convert import make_random_solo

    root = tmp_path_factory.mktemp("eval_offline")
    hf_dir = make_random_solo(str(root / "hf"), dtype=torch.float32)
    img = root / "images"
    img.mkdir()
    china, flower = (Image.open(os.path.join(PHOTOS, n)).convert("RGB") for n in ("china.jpg", "flower.jpg"))
    for i, box in enumerate([(0, 0, 64, 64), (100, 100, 164, 164), (200, 50, 264, 114)]):
        china.crop(box).save(img / f"c{i}.png")  # three 2x2-patch photos: prompts of one length
        flower.crop(box).save(img / f"f{i}.png")
    china.crop((0, 0, 96, 64)).save(img / "wide.png")  # another length
    flower.resize((1024, 1024)).save(img / "big.png")  # 32x32 patches: beyond the export's 512 positions
    (img / "bad.png").write_bytes(b"not an image")
    q = "What is in the image?"
    _jsonl(root / "vqa.jsonl", [{"question_id": n, "image": n + ".png", "question": q, "answers": ["temple"] * 10}
                                for n in ("c0", "c1", "c2", "f0", "wide", "big", "bad", "gone")])
    mc = [{"index": i, "image": f"f{i}.png", "question": "What is shown?", "A": "a flower", "B": "a car",
           "answer": "A"} for i in range(3)]
    _jsonl(root / "mc.jsonl", mc)
    _jsonl(root / "pope.jsonl", [{"question_id": i, "image": f"c{i}.png", "text": "Is there a dog?",
                                  "label": "no" if i else "yes"} for i in range(3)])
    tasks = {"vqa": {"kind": "open_vqa", "data": "vqa.jsonl", "image_root": "images", "max_new_tokens": 4},
             "mc": {"kind": "multiple_choice", "data": "mc.jsonl", "image_root": "images", "max_new_tokens": 3},
             "mc_ll": {"kind": "multiple_choice", "metric": "mc_loglikelihood", "data": "mc.jsonl",
                       "image_root": "images"},
             "pope": {"kind": "yes_no", "data": "pope.jsonl", "image_root": "images", "max_new_tokens": 3}}
    paths = []
    for name, desc in tasks.items():
        (root / f"{name}.json").write_text(json.dumps(desc))
        paths.append(str(root / f"{name}.json"))
    return {"root": root, "hf": hf_dir, "tasks": paths}


def _tool(*args):
    return subprocess.run([sys.executable, "tools/evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_evaluate_export_batched_equals_one_at_a_time(setup):
    out = setup["root"] / "out"
    r = _tool("--hf-dir", setup["hf"], "--tasks", ",".join(setup["tasks"]), "--output-dir", str(out),
              "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert list(summary) == ["vqa", "mc", "mc_ll", "pope"]
    assert summary["vqa"]["skipped"] == {"image_missing": 1, "image_unreadable": 1, "too_long": 1}
    assert summary["vqa"]["scored"] == 5 and summary["pope"]["scored"] == 3
    assert set(summary["pope"]["metrics"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    for name, s in summary.items():  # the table shows every task's figures and skips
        assert any(line.startswith(name) for line in r.stdout.splitlines())
    assert "1 image_missing, 1 image_unreadable, 1 too_long" in r.stdout

    # Each record is scored by the metric from its own output.
    for rec in records:
        if rec["task"] == "vqa":
            assert rec["score"] == M.vqa_accuracy(rec["output"], rec["reference"])
        if rec["task"] == "mc_ll":
            assert rec["predicted"] == max(rec["output"], key=rec["output"].get)
    got = summary["vqa"]["metrics"]["vqa_accuracy"]
    assert got == pytest.approx(sum(r["score"] for r in records if r["task"] == "vqa") / 5)

    # One sample at a time (each its own generate call) gives the same answers.
    from megatron_solo.eval.runner import HFExport, run_task

    backend = HFExport(setup["hf"])
    for path in setup["tasks"]:
        task = T.load_task(path)
        if task.scored_by_loglikelihood:
            continue
        one, _ = run_task(backend, task, batch_size=1)
        assert [x["output"] for x in one] == [x["output"] for x in records if x["task"] == task.name], task.name


def test_evaluate_checkpoint_at_tp2_pp2_gives_the_exports_answers(setup, tmp_path):
    """A checkpoint converted with TP=2 padding, evaluated by --load at TP=2 x PP=2 (torchrun, megatron-core's
    text generation controller and KV cache, no export written) answers as its export does: the same
    generated answers (batched, with images, skips counted alike) and the same option log-likelihoods;
    a tokenizer of another vocabulary is one error: line."""
    from megatron_solo.eval.runner import HFExport, run_task
    from megatron_solo.netutil import free_port

    ckpt = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", setup["hf"],
                        "--save", str(ckpt), "--target-tensor-parallel-size", "2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    tasks = [setup["tasks"][0], setup["tasks"][2]]  # vqa (generation; every kind of skip), mc_ll (log-likelihoods)
    out = tmp_path / "load"
    r = subprocess.run([sys.executable, "-m", "megatron_solo.training.torchrun", "--nproc-per-node", "4",
                        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "tools/evaluate.py",
                        "--load", str(ckpt), "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                        "--tasks", ",".join(tasks), "--output-dir", str(out), "--batch-size", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["samples.jsonl", "summary.json"]  # evaluated where it loads: no export
    got = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())

    backend = HFExport(setup["hf"])
    want, want_summary = [], {}
    for path in tasks:
        task = T.load_task(path)
        recs, want_summary[task.name] = run_task(backend, task, batch_size=4)
        want += [{"task": task.name, **rec} for rec in recs]
    assert [(g["task"], g["id"]) for g in got] == [(w["task"], w["id"]) for w in want] and len(got) == 8
    for g, w in zip(got, want):
        if g["task"] == "vqa":
            assert g == w  # the answers, parsed and scored alike
        else:  # float32 at TP=2 x PP=2 against the export: the same options, equal to rounding
            assert g["output"] == pytest.approx(w["output"], rel=1e-6) and g["predicted"] == w["predicted"]
    assert any(g["output"] for g in got if g["task"] == "vqa")
    assert {n: s["skipped"] for n, s in summary.items()} == {n: s["skipped"] for n, s in want_summary.items()}
    assert summary["vqa"]["skipped"] == {"image_missing": 1, "image_unreadable": 1, "too_long": 1}

    # Another vocabulary's tokenizer is refused before any model is built (tools/evaluate.py's error: line).
    from megatron_solo.data.tokenizer import mistral_tokenizer_path
    from megatron_solo.errors import UserError
    from megatron_solo.eval.megatron_backend import MegatronCheckpoint

    with pytest.raises(UserError, match="33031"):
        MegatronCheckpoint(str(ckpt), tokenizer_model=mistral_tokenizer_path())


def test_evaluate_bad_input_is_one_error_line(setup, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "yes_no", "metric": "vqa_accuracy", "data": "x.jsonl"}))
    r = _tool("--hf-dir", setup["hf"], "--tasks", str(bad), "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: task {bad}: metric 'vqa_accuracy' is not one of yes_no's metrics (pope)"], r.stderr
    r = _tool("--hf-dir", str(tmp_path), "--tasks", setup["tasks"][0], "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no processing_solo.py (not a SOLO export?)"], r.stderr
