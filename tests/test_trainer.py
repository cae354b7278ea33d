"""The Trainer's paths no other test covers: the batch layout the model receives for each
--transformer-impl (TE reported present and absent), NaN/inf loss skipping, --exit-interval and
--exit-duration-in-mins."""

import json

import pytest
import torch

from megatron_solo import cpu_backend
from megatron_solo.model import config as model_config
from megatron_solo.spec import MISTRAL_VOCAB
from megatron_solo.training.arguments import build_parser
from megatron_solo.training.config import build_train_config
from megatron_solo.training.trainer import make_forward_step
from tests.helpers_checkpoint import checkpoint_tensors


def _micro_batch():
    """Two packed rows of 8 tokens: row 0 holds documents of 3 and 5 tokens, row 1 one of 8."""
    b, s = 2, 8
    tokens = torch.arange(1, b * s + 1).reshape(b, s)
    return {"tokens": tokens, "labels": tokens.clone(), "loss_mask": torch.ones(b, s),
            "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))]),
            "doc_lengths": torch.tensor([[3, 5], [8, 0]], dtype=torch.int32),
            "image_doc_mask": torch.zeros(b, s, dtype=torch.bool), "patches": torch.zeros(0, 3072, dtype=torch.uint8)}


class _Recorder(torch.nn.Module):
    """Stands where the model stands in the schedule: keeps the keyword arguments it is called with."""

    def forward(self, **kwargs):
        self.kwargs = kwargs
        return torch.zeros(())


@pytest.mark.parametrize("te_present", [True, False], ids=["TE present", "TE absent"])
def test_batch_layout_follows_transformer_impl(te_present, monkeypatch):
    """On a GPU host with TE, --transformer-impl local must get [b, s] batches with the block-diagonal mask;
    --transformer-impl transformer_engine gets THD batches whatever this host has; no flag: TE if present."""
    monkeypatch.setattr(model_config, "te_available", lambda: te_present)
    monkeypatch.setattr(cpu_backend, "cuda_available", lambda: te_present)
    monkeypatch.setenv("WORLD_SIZE", "1")
    for impl in ("transformer_engine", "local", None):
        flags = ["--model", "tiny", "--seq-length", "8", "--train-iters", "1", "--data-path", "x"]
        cfg = build_train_config(build_parser().parse_args(flags + (["--transformer-impl", impl] if impl else [])))
        model = _Recorder()
        make_forward_step(cfg, cfg.transformer_config())(iter([_micro_batch()]), model)
        thd = impl == "transformer_engine" or (impl is None and te_present)
        kw = model.kwargs
        if thd:
            assert kw["packed_seq_params"] is not None and kw["packed_seq_params"].qkv_format == "thd", impl
            assert tuple(kw["input_ids"].shape) == (1, 16) and kw["attention_mask"] is None, impl
            assert kw["packed_seq_params"].cu_seqlens_q.tolist() == [0, 3, 8, 16], impl
        else:
            assert kw["packed_seq_params"] is None, impl
            assert tuple(kw["input_ids"].shape) == (2, 8) and tuple(kw["attention_mask"].shape) == (2, 1, 8, 8), impl


def _stop_runs(data, out_dir):
    """One rank, three runs of the real entry point (``main``) on the digits corpus, each ending early."""
    import contextlib
    import io
    import os

    from megatron_solo.train import main

    def run(name, *extra):
        flags = ["--model", "tiny", "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
                 "--data-path", data["pretrain"], "--split", "100,0,0", "--eval-iters", "0", "--num-workers", "0",
                 "--log-interval", "1", "--seed", "7", "--lr-decay-style", "constant",
                 "--save", os.path.join(out_dir, name), "--log-file", os.path.join(out_dir, name + ".jsonl"), *extra]
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(flags)
        return code, stdout.getvalue()

    # Adam moves every weight by about --lr per step, whatever the gradient: after one step of lr 1e30 the
    # forward pass overflows, and every later step has a NaN/inf loss or gradient.
    nan = run("nan", "--train-iters", "10", "--lr", "1e30", "--min-lr", "1e30", "--max-skipped-iters", "3",
              "--save-interval", "1")
    interval = run("interval", "--train-iters", "6", "--exit-interval", "3")
    duration = run("duration", "--train-iters", "6", "--exit-duration-in-mins", "1e-6")
    return {"nan": nan, "interval": interval, "duration": duration}


@pytest.fixture(scope="module")
def stop_runs(digits_data, tmp_path_factory):
    from megatron_solo.testing.distributed import run_distributed

    out = tmp_path_factory.mktemp("stops")
    return str(out), run_distributed(_stop_runs, 1, digits_data, str(out), timeout=600)[0]


def _records(path):

    with open(path) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def _tracker(path):
    with open(f"{path}/latest_checkpointed_iteration.txt") as f:
        return int(f.read())


def test_nan_loss_steps_are_skipped_then_the_run_stops_with_exit_2(stop_runs):
    out, runs = stop_runs
    code, stdout = runs["nan"]
    assert code == 2, stdout[-3000:]
    assert ("error: 3 consecutive iterations had a NaN/inf loss or gradient; stopping (raise --max-skipped-iters, "
            "lower --lr, or check the data)") in stdout
    recs = _records(f"{out}/nan.jsonl")
    # Iteration 1 trains; 2-4 are skipped (the third in a row stops the run, before it saves).
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4]
    assert [r["skipped-iterations"] for r in recs] == [0, 1, 2, 3]
    assert recs[0]["grad-norm"] == recs[0]["grad-norm"] and all(r["grad-norm"] != r["grad-norm"] for r in recs[1:])
    assert _tracker(f"{out}/nan") == 3
    # A skipped step changes no weight and no optimizer state.
    for kind in (False, "values"):
        first = checkpoint_tensors(f"{out}/nan/iter_0000001", optimizer=kind)
        last = checkpoint_tensors(f"{out}/nan/iter_0000003", optimizer=kind)
        assert first.keys() == last.keys() and first
        assert all(torch.equal(first[k], last[k]) for k in first), kind
    # The run's checked vocabulary is recorded in each of its checkpoints (a run on another base's data saves that base's).
    with open(f"{out}/nan/iter_0000003/solo_checkpoint.json") as f:
        assert json.load(f)["vocab"] == MISTRAL_VOCAB.to_dict()


def test_exit_interval_saves_and_stops(stop_runs):
    out, runs = stop_runs
    code, stdout = runs["interval"]
    assert code == 0, stdout[-3000:]
    assert "exiting at iteration 3 (exit-interval)" in stdout
    assert [r["iteration"] for r in _records(f"{out}/interval.jsonl")] == [1, 2, 3]
    assert _tracker(f"{out}/interval") == 3


def test_exit_duration_saves_and_stops(stop_runs):
    out, runs = stop_runs
    code, stdout = runs["duration"]
    assert code == 0, stdout[-3000:]
    assert "exiting at iteration 1 (exit-duration-in-mins)" in stdout
    assert [r["iteration"] for r in _records(f"{out}/duration.jsonl")] == [1]
    assert _tracker(f"{out}/duration") == 1
