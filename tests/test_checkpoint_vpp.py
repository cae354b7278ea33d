"""A checkpoint loads at any virtual-pipeline layout (issue 11): one saved with a single model chunk at
TP=1 (as every converted Mistral is) resumes at TP=2 x PP=2 x DP=2 with interleaved stages (two chunks per
stage, four micro-batches per step), and continues the TP=1 loss curve. megatron-core stores each layer's tensors under its global layer
number, so the stored keys do not depend on the layout; the model weights, the distributed optimizer's
state (fully_reshardable) and the scheduler all cross over.

The model has ``--vision-experts full`` (issue 24): its routed layers (image tokens through their own norms,
QKV, output projection and MLP) must give the same curve at TP=2 with sequence parallelism, PP=2 with
interleaved stages and DP=2 with the distributed optimizer as at TP=1, from the one checkpoint."""

import json

import pytest

from tests.test_training import _common, _losses, _run

ITERS = 4


def test_tp1_checkpoint_resumes_at_tp2_pp2_dp2_interleaved(digits_data, tmp_path):
    ck = tmp_path / "ckpt"
    ref_dir, vpp_dir = tmp_path / "ref", tmp_path / "vpp"
    ref_dir.mkdir()
    vpp_dir.mkdir()
    # Micro-batches of one sample: 4 per DP rank in the interleaved run, more than its 2 stages, so its steady
    # state sends activations and gradients both ways between the two stages in one step (at PP=2 the previous
    # and the next stage are the same rank: megatron-core's batched send/receive swapped the two; see
    # training/config.py interleaved_p2p).
    opt = ["--use-distributed-optimizer", "--train-iters", str(ITERS), "--vision-experts", "full",
           "--micro-batch-size", "1"]
    # Reference: one process (TP=1, PP=1, one chunk), a checkpoint at iteration 2, on to ITERS.
    _run(1, _common(digits_data, str(ref_dir), *opt, "--save", str(ck), "--save-interval", "2"))
    ref = _losses(ref_dir / "log.jsonl")
    info = json.loads((ck / "iter_0000002" / "solo_checkpoint.json").read_text())
    assert info["num_model_chunks"] == 1 and info["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert info["model_args"]["vision_experts"] == "full"

    # 8 ranks: TP=2 x PP=2 x DP=2, 4 layers = 2 stages x 2 virtual stages of one layer.
    out = _run(8, _common(digits_data, str(vpp_dir), *opt, "--tensor-model-parallel-size", "2",
                          "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                          "--sequence-parallel", "--load", str(ck), "--ckpt-step", "2"), timeout=600)
    assert "world 8 = TP 2 x PP 2 x DP 2" in out and "at iteration 2," in out, out[-3000:]
    got = _losses(vpp_dir / "log.jsonl")
    assert sorted(got) == list(range(3, ITERS + 1))
    # Same weights, optimizer state and data order; only the order of fp32 reductions may differ (TP splits
    # the matmuls, DP sums gradients over two ranks). Measured on this CPU: equal to the last printed digit
    # (9.659810066 and 9.308488846 both ways); the tolerance is the TP/PP resharding test's.
    for i, v in got.items():
        assert v == pytest.approx(ref[i], rel=1e-5, abs=1e-6), (i, v, ref[i])
