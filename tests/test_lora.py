"""LoRA (issue 27): adapters on megatron-core's parallel linears through the real trainer, their checkpoints
and their export (merged, and as a PEFT adapter that ``peft.PeftModel`` loads onto the exported base).

One world of two gloo ranks runs every training here in-process with the trainer's own classes (one process
start-up for all of them): a base (1 iteration from scratch), then LoRA on every target (attention QKV and
output, MLP in and out, the patch embedding) from it at TP=2 with sequence parallelism, at PP=2 and at
TP=1 (DP=2), the same global batches; a resume of the TP=2 run from its iteration-1 checkpoint; and the
exports of the TP=2 run's checkpoint. The tests compare what the world returns and what it wrote."""

import os
import shutil

import pytest
import torch

from megatron_solo.testing.distributed import run_distributed
from tests.helpers_checkpoint import checkpoint_tensors
from tests.test_model_parallel import as_bytes, from_bytes

ITERS = 3
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "linear_qkv", "linear_proj", "linear_fc1",
        "linear_fc2", "vision_patch_embed", "--transformer-impl", "local"]
# smaller than the tiny preset: process start-up and the checkpoints are most of the time anyway
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--kv-channels", "16"]
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer"]


def _flags(data, *extra):
    return ["--model", "tiny", *SHAPE, "--seq-length", "128", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--lr", "5e-3", "--min-lr", "5e-4", "--weight-decay", "0.0", "--clip-grad", "1.0",
            "--data-path", data["pretrain"], "--split", "100,0,0", "--eval-interval", "1000", "--eval-iters", "1",
            "--log-interval", "100", "--seed", "7", "--num-workers", "0", "--tokenizer-model", data["tokenizer"],
            *extra]


def _train(flags) -> dict[int, float]:
    """One run of the trainer in this world, as ``megatron_solo.train.main`` runs it (without tearing the
    process group down); the logging rank's loss per iteration."""
    from megatron_solo.training import faults
    from megatron_solo.training.arguments import build_parser
    from megatron_solo.training.config import build_train_config
    from megatron_solo.training.trainer import Trainer

    cfg = build_train_config(build_parser().parse_args(flags))
    with faults.guarded_run(cfg) as vocab:
        trainer = Trainer(cfg, vocab)
        summary = trainer.train()
        trainer.close()
    return {h["iteration"]: h["lm loss"] for h in summary["history"] if "lm loss" in h}  # PP: the last stage's


def _worker(data, out):
    from megatron_solo.convert.megatron_io import megatron_to_hf

    p = {k: os.path.join(out, k) for k in ("base", "tp2", "tp1", "resumed", "merged", "adapter", "base_hf")}
    res = {"paths": p}
    _train(_flags(data, "--train-iters", "1", "--save", p["base"]))
    lora_from_base = [*LORA, "--load", p["base"], "--finetune", "--train-iters", str(ITERS)]
    res["tp2"] = _train(_flags(data, *TP2_SP, *lora_from_base, "--save", p["tp2"], "--save-interval", "2"))
    res["pp2"] = _train(_flags(data, "--pipeline-model-parallel-size", "2", *lora_from_base))
    res["tp1"] = _train(_flags(data, *lora_from_base, "--save", p["tp1"]))
    # A kill -9 after iteration 2's save: the relaunched stage (same command) resumes its own --save.
    if torch.distributed.get_rank() == 0:
        os.makedirs(p["resumed"])
        shutil.copytree(os.path.join(p["tp2"], "iter_0000002"), os.path.join(p["resumed"], "iter_0000002"))
        with open(os.path.join(p["resumed"], "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("2")
    torch.distributed.barrier()
    res["resumed"] = _train(_flags(data, *TP2_SP, *lora_from_base, "--save", p["resumed"]))
    res["merged"] = megatron_to_hf(p["tp2"], p["merged"], merge_lora=True, verify=True, verify_logits=True)
    res["adapter"] = megatron_to_hf(p["tp2"], p["adapter"])
    megatron_to_hf(p["base"], p["base_hf"])
    return res


@pytest.fixture(scope="module")
def lora_world(digits_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora"))
    results = [from_bytes(r) for r in run_distributed(as_bytes, 2, _worker, digits_data, out, timeout=600)]
    return results[-1]  # the logging rank: the last (PP=2's last stage)


def test_lora_loss_curves_at_tp2_sp_and_pp2_equal_tp1(lora_world):
    ref = lora_world["tp1"]
    assert sorted(ref) == list(range(1, ITERS + 1))
    assert ref[ITERS] < ref[1], ref  # the adapters learn
    # Only the order of fp32 reductions differs between layouts (as in the other layout tests).
    for layout in ("tp2", "pp2"):
        got = lora_world[layout]
        assert got.keys() == ref.keys()
        for i in ref:
            assert got[i] == pytest.approx(ref[i], rel=1e-5, abs=1e-6), (layout, i, got[i], ref[i])


def test_lora_checkpoints_hold_the_same_adapters_at_tp2_sp_and_tp1(lora_world):
    """The adapters as stored (whole tensors, every layout's shards put together: lora_b of the column-parallel
    layers split by rows, SwiGLU's as [gate; up]; lora_a of the row-parallel ones by columns) after the same
    three steps at TP=2 with SP and at TP=1: equal up to the order of fp32 reductions."""
    p = lora_world["paths"]
    tp2 = checkpoint_tensors(os.path.join(p["tp2"], f"iter_{ITERS:07d}"))
    tp1 = checkpoint_tensors(os.path.join(p["tp1"], f"iter_{ITERS:07d}"))
    names = [k for k in tp1 if k.endswith((".lora_a", ".lora_b"))]
    assert len(names) == 10 and tp2.keys() == tp1.keys()
    for k in names:
        assert (tp2[k] - tp1[k]).norm() <= 1e-4 * tp1[k].norm(), k


def test_lora_trains_only_the_adapters_and_the_optimizer_holds_only_them(lora_world):
    p = lora_world["paths"]
    base = checkpoint_tensors(os.path.join(p["base"], "iter_0000001"))
    end = checkpoint_tensors(os.path.join(p["tp2"], f"iter_{ITERS:07d}"))
    adapters = sorted(k for k in end if k.endswith((".lora_a", ".lora_b")))
    # every target of every layer (stacked over layers in the checkpoint) and the patch embedding
    assert adapters == sorted(f"{m}.{ab}" for m in ("decoder.layers.self_attention.linear_qkv",
                                                   "decoder.layers.self_attention.linear_proj",
                                                   "decoder.layers.mlp.linear_fc1", "decoder.layers.mlp.linear_fc2",
                                                   "vision_patch_embed") for ab in ("lora_a", "lora_b"))
    assert set(end) - set(adapters) == set(base)
    for name in base:
        assert torch.equal(base[name], end[name]), f"{name} moved under --lora-rank"
    for name in adapters:
        if name.endswith("lora_b"):
            assert end[name].abs().max() > 0, f"{name} did not train (it starts at zero)"
    opt = checkpoint_tensors(os.path.join(p["tp2"], f"iter_{ITERS:07d}"), optimizer=True)
    assert opt and all(k.endswith((".lora_a", ".lora_b")) for k in opt), opt


def test_lora_resume_after_a_kill_is_exact(lora_world):
    ref, got = lora_world["tp2"], lora_world["resumed"]
    assert sorted(got) == [ITERS]
    assert got[ITERS] == ref[ITERS]  # bit for bit
    p = lora_world["paths"]
    end = checkpoint_tensors(os.path.join(p["tp2"], f"iter_{ITERS:07d}"))
    resumed = checkpoint_tensors(os.path.join(p["resumed"], f"iter_{ITERS:07d}"))
    assert end.keys() == resumed.keys()
    for name in end:
        assert torch.equal(end[name], resumed[name]), name
    opt = checkpoint_tensors(os.path.join(p["tp2"], f"iter_{ITERS:07d}"), optimizer="values")
    resumed_opt = checkpoint_tensors(os.path.join(p["resumed"], f"iter_{ITERS:07d}"), optimizer="values")
    assert opt.keys() == resumed_opt.keys() and all(torch.equal(opt[k], resumed_opt[k]) for k in opt)


def test_merged_export_logits_equal_the_megatron_lora_model(lora_world):
    v = lora_world["merged"]["verify"]
    # every table tensor equals W + (alpha/r) B A bit for bit; the exported model's logits (text and an image)
    # equal those of the Megatron model with its adapters
    assert v["tensors_checked"] > 20
    assert v["max_abs_logit_diff"] <= v["tolerance"]


def test_peft_adapter_on_the_exported_base_gives_the_merged_logits(lora_world, plain_torch):
    import json

    import peft  # requirements.txt pins it; `make setup` installs it

    from transformers import AutoModelForCausalLM

    from megatron_solo.convert.megatron_io import export_vocab, verification_inputs

    p = lora_world["paths"]
    with open(os.path.join(p["adapter"], "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and "embed_vision_patch" in cfg["target_modules"]
    ids, patches = verification_inputs(32000, with_image=True, ids=export_vocab(p["merged"]))

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids, vision_patches=patches).logits

    load = lambda d: AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32)  # noqa: E731
    merged = logits(load(p["merged"]))
    base = load(p["base_hf"])
    without = logits(base)
    with_adapter = logits(peft.PeftModel.from_pretrained(base, p["adapter"]))
    assert (without - merged).abs().max() > 1e-2  # the adapters change the model: the check can fail
    assert (with_adapter - merged).abs().max() <= 1e-4 * merged.abs().max()


def test_resuming_adapters_against_another_base_fails_with_one_line(lora_world, digits_data, monkeypatch):
    from megatron_solo.training.arguments import ArgumentError, build_parser
    from megatron_solo.training.config import build_train_config

    p = lora_world["paths"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    flags = _flags(digits_data, *TP2_SP, *LORA, "--finetune", "--train-iters", str(ITERS + 1), "--save", p["tp2"])
    cfg = build_train_config(build_parser().parse_args(flags + ["--load", p["base"]]))  # its own base: fine
    assert cfg.model.lora.rank == 4 and cfg.model.lora_base["path"] == os.path.join(p["base"], "iter_0000001")
    with pytest.raises(ArgumentError) as exc:
        build_train_config(build_parser().parse_args(flags + ["--load", p["tp1"]]))
    msg = str(exc.value)
    assert "is not the base of the adapters" in msg and p["base"] in msg and "\n" not in msg
    # a LoRA checkpoint resumed without its adapters' flags names them
    with pytest.raises(ArgumentError) as exc:
        build_train_config(build_parser().parse_args(
            _flags(digits_data, *TP2_SP, "--train-iters", str(ITERS + 1), "--load", p["tp2"])))
    assert "--lora-rank 4 --lora-alpha 8" in str(exc.value) and "--merge-lora" in str(exc.value)


BAD_FLAGS = [
    (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--lora-alpha", "16"], "need --lora-rank"),
    (["--lora-rank", "8", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--lora-rank", "8", "--freeze-lm"], "drop --freeze-lm/--freeze-vision"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[m for _, m in BAD_FLAGS])
def test_bad_lora_flags_fail_with_one_line(extra, message, monkeypatch):
    from megatron_solo.training.arguments import ArgumentError, build_parser, validate_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = build_parser().parse_args(["--seq-length", "128", "--train-iters", "2", "--data-path", "x", *extra])
    with pytest.raises(ArgumentError) as exc:
        validate_args(args)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_lora_without_a_base_fails_with_one_line(monkeypatch):
    from megatron_solo.training.arguments import ArgumentError, build_parser
    from megatron_solo.training.config import build_train_config

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ArgumentError) as exc:
        build_train_config(build_parser().parse_args(
            ["--seq-length", "128", "--train-iters", "2", "--data-path", "x", "--lora-rank", "4"]))
    assert "--load BASE --finetune" in str(exc.value)
