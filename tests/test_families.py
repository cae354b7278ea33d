"""Base-model families (convert/families.py) on tiny random bases built with each family's own transformers
class and shipped with the real base tokenizers (Llama-3.2's, Qwen3's; tests/helpers_tokenizers.py):

* a converted base's text logits equal the family's class (fp32, rel <= 1e-5), the architecture read from
  config.json (Llama-3.x tied + llama3 RoPE scaling, Qwen2 QKV bias + rows past the tokenizer, Qwen3 q/k
  norm + head_dim != hidden/heads + tied), SOLO's vocabulary derived from the directory's tokenizer;
* the export loads with AutoModelForCausalLM (trust_remote_code), generates, and stops at the chat
  template's turn end (<|im_end|>); export -> import -> export is bit-identical;
* from the one converted checkpoint, two training steps at TP=2+SP, PP=2 and DP=2 give TP=1's losses, and
  a tied model's output layer on the last stage stays equal to the first stage's embedding at PP=2; for
  Qwen3 also with the successors' choices together (bidirectional image attention, mrope positions,
  images laid out without row separators: ``CHOICES``).

One spawned process (a world of one) runs every single-process Megatron step for all three (the TP=1
reference included), one world of two every parallel layout; the parent runs transformers.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_solo.testing.distributed import run_distributed
from tests.conftest import ROOT
from tests.helpers_convert import safetensors_tensors

FAMILIES = ("llama", "qwen2", "qwen3")


def _text_ids():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 120000, (2, 14), generator=g)  # ordinary BPE pieces of both tokenizers


def _world(paths):
    from megatron_solo.checkpoint import checkpoint_vocab
    from megatron_solo.convert.megatron_io import (
        build_full_model,
        hf_to_megatron,
        load_weights,
        megatron_logits,
        megatron_to_hf,
        read_checkpoint,
    )
    from megatron_solo.model import SoloModelArgs

    out = {}
    for fam in FAMILIES:
        p = {k: paths[f"{fam}_{k}"] for k in ("base", "ckpt", "hf", "ckpt2", "hf2")}
        out[f"{fam}_summary"] = hf_to_megatron(p["base"], p["ckpt"], verify=True, verify_logits=True)
        info = read_checkpoint(p["ckpt"])
        model_args = SoloModelArgs(**info["model_args"])
        model = build_full_model(model_args, int(info["padded_vocab_size"]))
        load_weights(model, info)
        out[f"{fam}_args"] = model_args.to_dict()
        out[f"{fam}_vocab"] = checkpoint_vocab(info).to_dict()
        out[f"{fam}_logits"] = megatron_logits(model, _text_ids())
        out[f"{fam}_names"] = sorted(n for n, _ in model.named_parameters())
        del model
        # export (its logits, text and image, checked against the Megatron model by --verify), re-import, export
        out[f"{fam}_export"] = megatron_to_hf(p["ckpt"], p["hf"], verify=True, verify_logits=True)
        hf_to_megatron(p["hf"], p["ckpt2"])
        megatron_to_hf(p["ckpt2"], p["hf2"])
        trained = _train(info, 1, 1, False)
        out[f"{fam}_train_tp1"], out[f"{fam}_grads_finite"] = trained["losses"], trained["grads_finite"]
        if fam == CHOICES_FAMILY:
            out[f"{fam}_choices_train_tp1"] = _train(info, 1, 1, False, choices=True)["losses"]
    return out


# The image choices of SOLO's successors, all together (docs/MODEL.md), trained at every layout from
# Qwen3's converted checkpoint: bidirectional image blocks, multimodal RoPE, no row separators.
CHOICES_FAMILY = "qwen3"
CHOICES = dict(image_attention="bidirectional", image_positions="mrope")


def _batch(vocab: dict, seed: int, row_separator: bool = True) -> dict:
    """A micro-batch (2 rows of 64) at this vocabulary's ids: an image document (2x3 patches, caption) and
    a chat per row, with each patch's (row, col). Words are ids 3..31999: text under every base's
    vocabulary (and Mistral's loss rule)."""
    from megatron_solo.spec import ASSISTANT, IMAGE, USER
    from tests.test_model_parallel import pack

    g = np.random.default_rng(seed)

    def words(n):
        return [int(x) for x in g.integers(3, 32000, n)]

    bos = [] if vocab["bos"] is None else [vocab["bos"]]
    img = ([vocab["vision_start"]] + [vocab["vision_patch"]] * 3 + [vocab["vision_row_sep"]] * row_separator
           + [vocab["vision_patch"]] * 3 + [vocab["vision_end"]])
    rows = []
    for _ in range(2):
        doc1 = (bos + img + words(12), [ASSISTANT] * len(bos) + [IMAGE] * len(img) + [ASSISTANT] * 12,
                g.integers(0, 256, (6, 3072), dtype=np.uint8))
        chat = bos + [vocab["im_start"]] + words(6) + [vocab["im_end"], vocab["im_start"]] + words(8) + [vocab["im_end"]]
        doc2 = (chat, [USER] * (len(bos) + 8) + [ASSISTANT] * 10, np.zeros((0, 3072), np.uint8))
        rows.append([doc1, doc2])
    batch = pack(rows)
    batch["patch_coords"] = torch.tensor([(r, c) for r in range(2) for c in range(3)] * 2)
    return batch


def _train(info: dict, tp: int, pp: int, sp: bool, steps: int = 2, choices: bool = False) -> dict:
    """``steps`` steps of DDP + Adam from the checkpoint ``info`` at TP x PP (DP = the rest of the world),
    4 micro-batches per step split over DP; the global loss of each step, and at PP > 1 with tied
    embeddings the first stage's embedding and the last stage's output layer after training. ``choices``:
    the model with ``CHOICES``, on batches without row separators."""
    import dataclasses

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_solo.checkpoint import checkpoint_vocab
    from megatron_solo.convert.megatron_io import load_weights
    from megatron_solo.model import SoloModelArgs, build_solo_model, build_transformer_config
    from megatron_solo.parallel import initialize_model_parallel
    from tests.test_model_parallel import run_schedule

    initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_args = SoloModelArgs(**info["model_args"])
    if choices:
        model_args = dataclasses.replace(model_args, **CHOICES)
    config = build_transformer_config(model_args, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      sequence_parallel=sp, use_te=False)
    model = build_solo_model(model_args, config, padded_vocab_size=int(info["padded_vocab_size"]), use_te=False)
    load_weights(model, info)
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config=config, module=model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    opt = get_megatron_optimizer(config=OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0), model_chunks=[ddp])
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    vocab = checkpoint_vocab(info).to_dict()
    losses = []
    for step in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        batches = [_batch(vocab, step * 4 + dp_rank * (4 // dp) + j, row_separator=not choices) for j in range(4 // dp)]
        reports = run_schedule([ddp], config, batches, model_args=model_args)
        ok, _, _ = opt.step()
        assert ok
        if reports is not None:
            total = torch.stack(reports).sum(0).double()  # [loss sum, tokens] over this rank's micro-batches
            torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
            losses.append(float(total[0] / total[1]))
    out = {"losses": losses or None, "stage": parallel_state.get_pipeline_model_parallel_rank()}
    if torch.distributed.get_world_size() == 1:  # the trainer's skip check sees a NaN or inf in any gradient
        from megatron_solo.training.trainer import grads_finite

        g = next(p for p in model.parameters() if p.requires_grad).main_grad.view(-1)
        checks = [grads_finite([ddp])]
        for bad in (float("nan"), float("inf")):
            g[-1] = bad
            checks.append(grads_finite([ddp]))
        out["grads_finite"] = checks
    if pp > 1 and model_args.tie_word_embeddings:
        out["tied"] = (model.embedding.word_embeddings.weight if model.pre_process
                       else model.output_layer.weight).detach().clone()
    return out


def _parallel_world(paths):
    from megatron_solo.convert.megatron_io import read_checkpoint

    out = {}
    for fam in FAMILIES:
        info = read_checkpoint(paths[f"{fam}_ckpt"])
        for name, (tp, pp, sp) in LAYOUTS.items():
            out[f"{fam}_{name}"] = _train(info, tp, pp, sp)
            if fam == CHOICES_FAMILY:
                out[f"{fam}_choices_{name}"] = _train(info, tp, pp, sp, choices=True)
    return as_bytes(out)


LAYOUTS = {"tp2_sp": (2, 1, True), "pp2": (1, 2, False), "dp2": (1, 1, False)}


def as_bytes(obj) -> bytes:
    """Tensors through the result queue as bytes (a shared-memory handle dies with its rank)."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory, hf_tokenizers):
    from tests.helpers_convert import FAMILY_TOKENIZERS, make_random_base

    root = tmp_path_factory.mktemp("families")
    paths = {}
    for i, fam in enumerate(FAMILIES):
        paths.update({f"{fam}_{k}": str(root / f"{fam}_{k}") for k in ("base", "ckpt", "hf", "ckpt2", "hf2")})
        make_random_base(paths[f"{fam}_base"], fam, seed=20 + i, tokenizer_dir=hf_tokenizers[FAMILY_TOKENIZERS[fam]])
    return paths, run_distributed(_world, 1, paths, timeout=900)[0]


@pytest.fixture(scope="module")
def parallel(world):
    import io

    paths, _ = world
    return [torch.load(io.BytesIO(r), weights_only=False)
            for r in run_distributed(_parallel_world, 2, paths, timeout=900)]


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_layouts_train_like_tp1_from_the_converted_checkpoint(world, parallel, family):
    _, out = world
    ref = out[f"{family}_train_tp1"]
    assert len(ref) == 2 and all(np.isfinite(ref))
    for name in LAYOUTS:
        got = next(r[f"{family}_{name}"]["losses"] for r in parallel if r[f"{family}_{name}"]["losses"])
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"{family} {name}")
    if family == CHOICES_FAMILY:  # the successors' choices together, every layout against their TP=1
        ref_choices = out[f"{family}_choices_train_tp1"]
        assert len(ref_choices) == 2 and all(np.isfinite(ref_choices))
        for name in LAYOUTS:
            got = next(r[f"{family}_choices_{name}"]["losses"] for r in parallel
                       if r[f"{family}_choices_{name}"]["losses"])
            np.testing.assert_allclose(got, ref_choices, rtol=1e-5, err_msg=f"{family} choices {name}")
    by_stage = {r[f"{family}_pp2"]["stage"]: r[f"{family}_pp2"] for r in parallel}
    if out[f"{family}_args"]["tie_word_embeddings"]:  # llama, qwen3: the last stage's copy stayed equal
        assert torch.equal(by_stage[0]["tied"], by_stage[1]["tied"])


@pytest.mark.usefixtures("plain_torch")
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_base_text_logits_equal_the_family_class(world, family):
    import transformers

    from megatron_solo.convert.families import FAMILIES as TABLE

    paths, out = world
    assert out[f"{family}_grads_finite"] == [True, False, False]  # the trainer's skip check: finite; a NaN; an inf
    base_size = out[f"{family}_vocab"]["base_size"]
    ref_model = getattr(transformers, TABLE[family].hf_class).from_pretrained(paths[f"{family}_base"],
                                                                              dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(input_ids=_text_ids()).logits[..., :base_size]
    got = out[f"{family}_logits"][..., :base_size]
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, f"{family}: max rel logit diff {rel:.3g}"
    # --verify ran with the family's class too (tensors bit for bit, logits).
    assert out[f"{family}_summary"]["verify"]["tensors_checked"] > 0


def test_architecture_and_vocabulary_come_from_the_base_directory(world):
    _, out = world
    llama, qwen2, qwen3 = (out[f"{f}_args"] for f in FAMILIES)
    assert (llama["family"], llama["rope_scaling"], llama["rope_scaling_factor"], llama["rotary_base"]) == \
        ("llama", "llama3", 32.0, 500000)
    assert llama["tie_word_embeddings"] and not llama["qkv_bias"] and not llama["qk_layernorm"]
    assert qwen2["qkv_bias"] and not qwen2["tie_word_embeddings"] and qwen2["rope_scaling"] is None
    assert qwen3["qk_layernorm"] and qwen3["tie_word_embeddings"] and qwen3["kv_channels"] == 16
    # SOLO's vocabulary over each directory's tokenizer: Llama-3.2's 128257 tokens + 1031 pieces; Qwen's
    # 151669 tokens (its 151936 rows pad past them) + 1029 (its own <|im_start|>/<|im_end|> reused).
    assert [a["vocab_size"] for a in (llama, qwen2, qwen3)] == [128257 + 1031, 151669 + 1029, 151669 + 1029]
    assert (out["qwen3_vocab"]["im_end"], out["qwen3_vocab"]["bos"]) == (151645, None)
    # megatron-core's own modules: a bias on linear_qkv, q/k layernorms, no output layer when tied.
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in out["qwen2_names"]
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in out["qwen3_names"]
    assert "output_layer.weight" not in out["llama_names"] and "output_layer.weight" in out["qwen2_names"]


@pytest.mark.usefixtures("plain_torch")
@pytest.mark.parametrize("family", FAMILIES)
def test_export_generates_stops_at_turn_end_and_round_trips(world, family):
    from transformers import AutoModelForCausalLM

    paths, out = world
    d, vocab = paths[f"{family}_hf"], out[f"{family}_vocab"]
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["solo_family"] == family and cfg["solo_vocab"] == vocab
    assert out[f"{family}_export"]["verify"]["tensors_checked"] > 0
    gen_cfg = json.load(open(os.path.join(d, "generation_config.json")))  # llama3's <|eot_id|> stops too
    assert gen_cfg["eos_token_id"] == [vocab["eos"], vocab["im_end"]] + ([128009] if family == "llama" else [])
    # export -> import -> export: every tensor bit-identical, same config
    a, b = safetensors_tensors(d), safetensors_tensors(paths[f"{family}_hf2"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(os.path.join(paths[f"{family}_hf2"], "config.json"))) == cfg

    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__name__ == cfg["architectures"][0]
    prompt = _text_ids()[:1]  # no chat markers in it: the turn end's rows below touch nothing it reads
    with torch.no_grad():
        h = model.model(input_ids=prompt).last_hidden_state[0, -1]
        # A trained model ends its answer with <|im_end|>; make this one do so at its first step.
        model.lm_head.weight[vocab["im_end"]] = 50 * h / h.norm() ** 2
    gen = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] == prompt.shape[1] + 1 and gen[0, -1].item() == vocab["im_end"]  # stopped there
    more = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, eos_token_id=vocab["eos"])
    assert more.shape[1] == prompt.shape[1] + 6  # without the turn end as a stop token it runs on


# The public config.json values of these bases (written from knowledge of those files, nothing is
# downloaded), as each family's transformers config takes them; "rows": the base's embedding rows.
PUBLIC_CONFIGS = {
    "qwen3-8b": ("Qwen3ForCausalLM", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                          vocab_size=151936, tie_word_embeddings=False)),
    "qwen3-1.7b": ("Qwen3ForCausalLM", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                            num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                            vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2ForCausalLM", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                            tie_word_embeddings=False)),
    "llama3.1-8b": ("LlamaForCausalLM", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                             tie_word_embeddings=False)),
}


@pytest.mark.parametrize("preset", sorted(PUBLIC_CONFIGS))
def test_preset_dry_run_counts_the_family_model_plus_solo_additions(preset, monkeypatch):
    """--dry-run's count of a preset = the family's transformers model built on the meta device from the
    public config values, with its vocabulary rows replaced by SOLO's (Qwen's padding rows past its
    tokenizer are not kept) and the patch embedding added; vocabulary padding counted apart."""
    import transformers

    from megatron_solo import cpu_backend
    from megatron_solo.spec import PATCH_DIM
    from megatron_solo.training.arguments import build_parser
    from megatron_solo.training.config import build_train_config
    from megatron_solo.training.dry_run import plan

    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = build_train_config(build_parser().parse_args(
        ["--model", preset, "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
         "--train-iters", "1", "--data-path", "none"]))
    p = plan(cfg)
    cls_name, hf = PUBLIC_CONFIGS[preset]
    cls = getattr(transformers, cls_name)
    with cpu_backend.suspended(), torch.device("meta"):  # the backend's device mode would build it on the CPU
        n_hf = sum(t.numel() for t in cls(cls.config_class(**hf)).parameters())  # tied matrices counted once
    matrices = 1 if hf["tie_word_embeddings"] else 2
    solo_rows = cfg.model.args.vocab_size - hf["vocab_size"]
    want = n_hf + matrices * solo_rows * hf["hidden_size"] + PATCH_DIM * hf["hidden_size"]
    assert p["parameters_without_padding"] == want


def test_training_takes_the_architecture_of_the_checkpoint_it_starts_from(world, tmp_path, monkeypatch):
    """Started from a converted base (and resumed from a run of it) without --model or shape flags, the run
    builds the checkpoint's architecture and says so in one line; --use-checkpoint-args (Megatron-LM's
    explicit form) does so over a --model; a preset or shape flag that disagrees is one error naming both
    ways out. (A real training run from a converted base without architecture flags: the BASE=qwen3
    quickstart, tests/test_demo.py.)"""
    import shutil

    from megatron_solo.training.arguments import ArgumentError, build_parser
    from megatron_solo.training.config import build_train_config

    paths, out = world
    monkeypatch.setenv("WORLD_SIZE", "1")
    ck = paths["qwen3_ckpt"]

    def cfg(*flags):
        return build_train_config(build_parser().parse_args(
            ["--seq-length", "64", "--train-iters", "2", "--data-path", "x", *flags]))

    def refused(*flags):
        with pytest.raises(ArgumentError) as e:
            cfg(*flags)
        assert "\n" not in str(e.value)
        return str(e.value)

    started = cfg("--load", ck, "--finetune")
    assert started.model.args.to_dict() == out["qwen3_args"] and started.model.preset is None
    assert started.model.source_note == (f"architecture: the checkpoint's in {ck} (qwen3, 2 layers, hidden 64, "
                                         f"vocabulary {out['qwen3_args']['vocab_size']})")
    assert started.model.padded_vocab_size == 152704  # the checkpoint's own padding
    # a run resumed from its own --save (a restarted stage: --finetune of the base ignored)
    save = tmp_path / "run"
    shutil.copytree(ck, save)
    resumed = cfg("--load", ck, "--finetune", "--save", str(save))
    assert resumed.model.args == started.model.args and resumed.resume.load_dir == str(save)
    assert resumed.model.source_note.startswith(f"architecture: the checkpoint's in {save} (qwen3")
    over = cfg("--load", ck, "--finetune", "--use-checkpoint-args", "--model", "tiny", "--rotary-base", "5000")
    assert over.model.args.to_dict() == {**out["qwen3_args"], "rotary_base": 5000}
    assert over.model.source_note.endswith(" with --rotary-base 5000 (--use-checkpoint-args)")
    assert cfg("--model", "tiny").model.source_note is None  # no checkpoint: the preset, nothing to say
    assert refused("--load", ck, "--finetune", "--model", "tiny") == (
        f"--model tiny builds a model with num_layers 4, hidden_size 128, ffn_hidden_size 352, num_attention_heads "
        f"4, kv_channels 32, vocab_size 33031, qk_layernorm False, tie_word_embeddings False, but --load {ck} holds "
        f"num_layers 2, hidden_size 64, ffn_hidden_size 96, num_attention_heads 6, kv_channels 16, vocab_size "
        f"{out['qwen3_args']['vocab_size']}, qk_layernorm True, tie_word_embeddings True: drop --model tiny to train "
        f"the checkpoint's architecture, or start from a checkpoint of that shape (another --load)")
    assert refused("--load", ck, "--finetune", "--save", str(save), "--hidden-size", "128") == (
        f"--hidden-size 128 builds a model with hidden_size 128, but --save {save} holds hidden_size 64: drop "
        f"--hidden-size 128 to train the checkpoint's architecture, or start from a checkpoint of that shape "
        f"(another --save)")
    assert refused("--use-checkpoint-args").startswith("--use-checkpoint-args takes the architecture of the --load "
                                                       "checkpoint, but no --load is given: drop")


def test_the_base_directory_tokenizer_is_the_one_used(world, hf_tokenizers, tmp_path, capsys):
    """A --tokenizer-model of another base than the directory's is refused (as a new user would try: a
    Llama checkpoint with Mistral's tokenizer); the same tokenizer (base or SOLO-extended) is accepted; a
    directory without a tokenizer converts with the given one and says so."""
    import shutil

    from megatron_solo.convert.errors import ConversionError
    from megatron_solo.convert.hf_export_files import resolve_tokenizer
    from megatron_solo.data.tokenizer import load_tokenizer, mistral_tokenizer_path

    paths, out = world
    llama_json = os.path.join(hf_tokenizers["llama"], "tokenizer.json")
    with pytest.raises(ConversionError, match=r"--tokenizer-model .* differs from .*qwen3_base's own tokenizer"):
        resolve_tokenizer("qwen3", paths["qwen3_base"], llama_json, str(tmp_path / "a"))
    with pytest.raises(ConversionError, match="differs from"):
        resolve_tokenizer("llama", paths["llama_base"], mistral_tokenizer_path(), str(tmp_path / "b"))
    got = resolve_tokenizer("qwen3", paths["qwen3_base"], hf_tokenizers["solo_qwen"], str(tmp_path / "c"))
    assert got == hf_tokenizers["solo_qwen"]  # SOLO's extension of the directory's own base: used as is
    bare = str(tmp_path / "bare")
    shutil.copytree(paths["llama_base"], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ConversionError, match="needs --tokenizer-model: .* holds no tokenizer"):
        resolve_tokenizer("llama", bare, None, str(tmp_path / "d"))
    # as a new user would meet it: one error line from the tool, nothing written
    r = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", paths["llama_base"],
                        "--tokenizer-model", "mistral-common", "--save", str(tmp_path / "ck")], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "differs from" in errors[0] and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "ck" / "latest_checkpointed_iteration.txt")
    capsys.readouterr()
    made = resolve_tokenizer("llama", bare, llama_json, str(tmp_path / "e"))
    assert "has no tokenizer of its own; converting with --tokenizer-model" in capsys.readouterr().err
    assert load_tokenizer(made).vocab.to_dict() == out["llama_vocab"]


@pytest.mark.usefixtures("plain_torch")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_export_processor_loads_natively_and_round_trips(world, family, tmp_path):
    """AutoProcessor gives the export's SoloProcessor; processor(text=..., images=...) places each image
    at its <image> (an image nothing places is an error); the tokenizer's and the processor's
    apply_chat_template give the same ChatML ids; model and processor saved with save_pretrained load again."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    paths, out = world
    d, vocab = paths[f"{family}_hf"], out[f"{family}_vocab"]
    proc = AutoProcessor.from_pretrained(d, trust_remote_code=True)
    assert type(proc).__name__ == "SoloProcessor"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    inputs = proc(text="Look: <image> What is it?", images=img)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(vocab["vision_patch"]) == 6 and inputs["vision_patches"].shape == (6, 3072)
    assert ids[: len(proc._bos()) + 0] == ([] if vocab["bos"] is None else [vocab["bos"]])
    with pytest.raises(ValueError, match="placeholder"):
        proc(text="no place for it", images=img)
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
    gen = model.generate(**inputs, max_new_tokens=2, do_sample=False, min_new_tokens=2)
    assert gen.shape[1] == len(ids) + 2

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    want = proc.apply_chat_template(msgs)
    assert want[-3] == vocab["im_start"] and vocab["im_end"] in want
    # the base's special tokens typed by a user stay text in the processor (the HF tokenizer would match them)
    typed = proc.apply_chat_template([{"role": "user", "content": "<|endoftext|><|begin_of_text|><vpatch>"}])
    markers = {vocab["im_start"], vocab["im_end"]} | ({vocab["bos"]} if vocab["bos"] is not None else set())
    assert all(i < vocab["base_size"] and i not in vocab["base_special_ids"] for i in typed if i not in markers)
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    assert list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)) == want
    hf_msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]}]
    assert proc.apply_chat_template(hf_msgs, return_dict=True)["vision_patches"].shape == (6, 3072)

    saved = str(tmp_path / "saved")
    model.save_pretrained(saved)
    proc.save_pretrained(saved)
    again = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    assert again.apply_chat_template(msgs) == want
    assert torch.equal(again(text="Look: <image> What is it?", images=img)["input_ids"], inputs["input_ids"])
    reloaded = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
