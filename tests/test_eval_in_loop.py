"""--eval-tasks in the training loop at TP=2 x PP=2: the digits as a log-likelihood multiple-choice task
(the ten digit words as options) and as a generation task (greedy answers, exact match) scored every 2
iterations, their figures on a line and in the log file as eval/<task>/<metric> with the per-sample
records, a pretrain-format task said and left out, the training curve bitwise the curve of the same run
without evaluation, and the last figures and answers equal to tools/evaluate.py's on the last checkpoint's
export."""

import json
import os
import subprocess
import sys

import pytest

from megatron_solo.demo.digits import QUESTION, WORDS
from tests.conftest import ROOT
from tests.test_training import _losses, _run


def _args(data, out, *extra):
    return ["--model", "tiny", "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "4", "--lr", "2e-3", "--lr-warmup-iters", "1", "--data-path", data["sft"],
            # a wider initialisation than the default 0.02: the greedy answers compared below differ token
            # by token (after 4 iterations from 0.02 every answer is "\n\n\n...")
            "--init-method-std", "0.1",
            "--split", "100,0,0", "--log-interval", "1", "--seed", "7", "--tokenizer-model", data["tokenizer"],
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--log-file", os.path.join(out, "log.jsonl"), *extra]


def test_eval_tasks_in_the_loop_at_tp2_pp2_leave_training_unchanged(digits_data, tmp_path):
    corpus = os.path.join(digits_data["root"], "corpus")
    with open(os.path.join(corpus, "test.jsonl")) as f:
        rows = [json.loads(line) for line in f][:6]
    with open(tmp_path / "digits_mc.jsonl", "w") as f:
        f.writelines(json.dumps({"image": r["image"], "question": QUESTION, "choices": list(WORDS),
                                 "answer": r["label"]}) + "\n" for r in rows)
    (tmp_path / "digits_mc.json").write_text(json.dumps({
        "kind": "multiple_choice", "metric": "mc_loglikelihood", "data": "digits_mc.jsonl", "image_root": corpus,
        "prompt": "{question}"}))
    (tmp_path / "digits_gen.json").write_text(json.dumps({
        "kind": "exact_match", "data": os.path.join(corpus, "test.jsonl"), "prompt": QUESTION, "limit": 3,
        "max_new_tokens": 6}))
    (tmp_path / "digits_pre.json").write_text(json.dumps({
        "kind": "exact_match", "data": os.path.join(corpus, "test.jsonl"), "prompt": "", "prompt_format": "pretrain",
        "limit": 1}))
    tasks = [str(tmp_path / f"digits_{n}.json") for n in ("mc", "gen", "pre")]
    on, off = tmp_path / "on", tmp_path / "off"
    out = _run(4, _args(digits_data, str(on), "--save", str(on / "ckpt"), "--eval-tasks", ",".join(tasks),
                        "--eval-tasks-interval", "2"))
    _run(4, _args(digits_data, str(off)))

    assert _losses(on / "log.jsonl") == _losses(off / "log.jsonl")  # bitwise: the floats as logged
    assert len(_losses(on / "log.jsonl")) == 4
    log = [json.loads(line) for line in open(on / "log.jsonl")]
    evals = [e for e in log if e["kind"] == "eval"]
    assert [e["iteration"] for e in evals] == [2, 2, 4, 4]  # one record per task and time
    evals = {(e["iteration"], k): v for e in evals for k, v in e.items() if k.startswith("eval/")}
    for it in (2, 4):
        assert 0.0 <= evals[it, "eval/digits_mc/accuracy"] <= 1.0 and 0.0 <= evals[it, "eval/digits_gen/accuracy"] <= 1.0
    assert "eval task digits_pre: its prompt_format is pretrain; not run in the training loop" in out
    # generation on megatron-core's inference machinery (mcore_generation), said once
    assert out.count("eval generation tasks decode on megatron-core's text generation controller with its KV cache") == 1
    assert out.count(" eval task digits_mc at iteration ") == 2 and out.count(" eval task digits_gen at iteration ") == 2
    in_loop = {e["task"]: e["samples"] for e in log if e["kind"] == "eval_samples" and e["iteration"] == 4}

    # The offline figure: tools/evaluate.py on the export of the last checkpoint scores the same options.
    for cmd in (["tools/convert_checkpoint.py", "megatron-to-hf", "--load", str(on / "ckpt"), "--save", str(on / "hf")],
                ["tools/evaluate.py", "--hf-dir", str(on / "hf"), "--tasks", ",".join(tasks[:2]),
                 "--output-dir", str(on / "eval")]):
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((on / "eval" / "summary.json").read_text())
    offline = summary["digits_mc"]
    assert offline["scored"] == 6 and offline["metrics"]["accuracy"] == evals[4, "eval/digits_mc/accuracy"]
    assert offline["metrics"]["reference_loglikelihood"] == pytest.approx(
        evals[4, "eval/digits_mc/reference_loglikelihood"], rel=1e-4)  # TP=2 x PP=2 vs the export, float32
    # Generation: the greedy answers of TP=2 x PP=2 in the loop (megatron-core's controller and KV cache) are
    # the export's (transformers' generate, KV cache).
    records = [json.loads(line) for line in (on / "eval" / "samples.jsonl").read_text().splitlines()]
    offline_answers = [(r["id"], r["output"]) for r in records if r["task"] == "digits_gen"]
    assert len(offline_answers) == 3 and any(a for _, a in offline_answers)
    assert [(r["id"], r["output"]) for r in in_loop["digits_gen"]] == offline_answers
    assert summary["digits_gen"]["metrics"]["accuracy"] == evals[4, "eval/digits_gen/accuracy"]
    assert [r["predicted"] for r in in_loop["digits_mc"]] == [r["predicted"] for r in records if r["task"] == "digits_mc"]
