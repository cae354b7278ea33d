"""Vision experts (``--vision-experts ffn|full``, model/vision_experts.py) against a reference written
here from the definition, and across parallel layouts.

The reference runs each layer twice in plain PyTorch, once with the text weights on *all* tokens and
once with the expert weights on all tokens, and picks per token by the image mask (the ``<vpatch>``
positions); for ``full`` it recomputes attention with each token's own Q/K/V (joint softmax over all
keys). The model computes each token once (gather by modality, scatter back): logits and gradients
must agree in fp32 (rel <= 1e-5) on a packed batch of image and text documents.

One world of two gloo ranks runs everything once (the tests compare what it returns): at TP=1 (both
ranks, DP=2) the reference checks; then ``full`` at TP=2 with sequence parallelism against TP=1.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_solo.spec import SOLO_IDS
from megatron_solo.testing.distributed import run_distributed
from tests.test_model_parallel import WINDOW, as_bytes, from_bytes, mixed_batch

REL = 1e-5


@functools.lru_cache(maxsize=None)
def _batch() -> dict:
    """The packed batch (row 0: image document + text chat; row 1: chat with an image + image
    document), made once per rank (the photos take seconds to load and resize)."""
    return mixed_batch()


def _args(vision_experts: str):
    from megatron_solo.model import SoloModelArgs

    # 2 layers of the tiny preset: enough for an expert layer to feed another.
    return SoloModelArgs.from_preset("tiny", num_layers=2, sliding_window=WINDOW, init_method_std=0.05,
                                     vision_experts=vision_experts)


def _build(vision_experts: str, seed: int = 1234, lora=None, **cfg):
    from megatron.core import parallel_state

    from megatron_solo.model import build_solo_model, build_transformer_config
    from megatron_solo.parallel import set_seed

    args = _args(vision_experts)
    config = build_transformer_config(
        args, tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(), **cfg)
    set_seed(seed)
    torch.manual_seed(seed)
    return build_solo_model(args, config, padded_vocab_size=args.padded_vocab_size(2), lora=lora), config, args


# ------------------------------------------------------------------------------------- the reference
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, base):
    """Non-interleaved RoPE (rotate-half), positions [s, b] -> x [s, b, heads, d]."""
    d = x.size(-1)
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos.float()[..., None] * inv  # [s, b, d/2]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, :, None], torch.cat([ang, ang], -1).sin()[:, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attention_mask(doc_lengths, s, window):
    """[b, s, s] True where query i may see key j: same document, causal, within the window."""
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(r)), r.long()) for r in doc_lengths])
    i = torch.arange(s)
    return (doc[:, :, None] == doc[:, None, :]) & (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :]) < window)


def _select(image, vision_value, text_value):
    return torch.where(image[..., None], vision_value, text_value)


def reference_forward(model, args, batch, experts: str):
    """Logits [b, s, V] of ``model``'s weights computed from the definition (see the module docstring)."""
    tokens = batch["tokens"]
    image = (tokens == SOLO_IDS.vision_patch).t()  # [s, b]
    s, b = image.shape
    x = model.embed_inputs(tokens, batch["position_ids"], batch["patches"])  # [s, b, h]: not under test
    allowed = _attention_mask(batch["doc_lengths"], s, args.sliding_window)  # [b, s, s]
    pos = batch["position_ids"].t()
    nh, ng, hn, eps = args.num_attention_heads, args.num_query_groups, args.kv_channels, args.norm_epsilon
    for layer in model.decoder.layers:
        att = layer.self_attention
        text = dict(norm1=layer.input_layernorm.weight, qkv=att.linear_qkv.weight, proj=att.linear_proj.weight,
                    norm2=layer.pre_mlp_layernorm.weight, fc1=layer.mlp.linear_fc1.weight, fc2=layer.mlp.linear_fc2.weight)
        vision = dict(text, norm2=layer.vision_pre_mlp_layernorm.weight, fc1=layer.vision_mlp.linear_fc1.weight,
                      fc2=layer.vision_mlp.linear_fc2.weight)
        if experts == "full":
            vision.update(norm1=layer.vision_input_layernorm.weight, qkv=att.vision_linear_qkv.weight,
                          proj=att.vision_linear_proj.weight)

        def both(f):
            return _select(image, f(vision), f(text))

        qkv = both(lambda w: _rms(x, w["norm1"], eps) @ w["qkv"].t())  # each token's own Q/K/V
        qkv = qkv.view(s, b, ng, (nh // ng + 2) * hn)
        q, k, v = torch.split(qkv, [nh // ng * hn, hn, hn], dim=-1)
        q = _rope(q.reshape(s, b, nh, hn), pos, args.rotary_base)
        k = _rope(k, pos, args.rotary_base).repeat_interleave(nh // ng, dim=2)
        v = v.repeat_interleave(nh // ng, dim=2)
        scores = torch.einsum("ibhd,jbhd->bhij", q, k) / hn ** 0.5
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        ctx = torch.einsum("bhij,jbhd->ibhd", scores.softmax(-1), v).reshape(s, b, nh * hn)
        x = x + both(lambda w: ctx @ w["proj"].t())

        def mlp(w):
            gate, up = (_rms(x, w["norm2"], eps) @ w["fc1"].t()).chunk(2, dim=-1)
            return (torch.nn.functional.silu(gate) * up) @ w["fc2"].t()

        x = x + both(mlp)
    x = _rms(x, model.decoder.final_layernorm.weight, eps)
    return (x @ model.output_layer.weight.t()).transpose(0, 1)[..., : args.vocab_size]


def _loss(logits, batch):
    """A scalar of every logit: the cross entropy at *every* position (SOLO's loss mask leaves out the
    image positions, whose last-layer expert MLP would then get no gradient to compare)."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _model_logits(model, config, batch):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_solo.model import model_forward_kwargs

    kwargs = model_forward_kwargs(batch, config)
    kwargs.pop("labels")
    logits = gather_from_tensor_model_parallel_region(model(**kwargs))  # [b, s, V_padded]
    return logits[..., : model.real_vocab_size]


def _check_against_reference(experts: str):
    model, config, args = _build(experts)
    batch = _batch()
    out = {}
    logits = _model_logits(model, config, batch)
    _loss(logits, batch).backward()
    out["model"] = (logits.detach().clone(), _grads(model))
    model.zero_grad(set_to_none=True)
    ref = reference_forward(model, args, batch, experts)
    _loss(ref, batch).backward()
    out["reference"] = (ref.detach().clone(), _grads(model))
    # The experts are real: their weights differ from the text twins, and both kinds of token are in the batch.
    layer = model.decoder.layers[0]
    out["experts_differ"] = not torch.equal(layer.vision_mlp.linear_fc1.weight, layer.mlp.linear_fc1.weight)
    out["n_image"] = int((batch["tokens"] == SOLO_IDS.vision_patch).sum())
    return out


def _stacked(name: str) -> bool:
    """A tensor whose TP shards are [gate_r; up_r] (SwiGLU's fc1 and its LoRA B): regrouped to [gate; up]."""
    return name.endswith(("linear_fc1.weight", "linear_fc1.lora_b"))


def _set_lora_b(model, tp: int) -> None:
    """Every adapter's B (zero at the start) set to the same full values at any TP, so that A's gradients and
    the adapters' outputs are not zero."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("lora_b"):
                continue
            split = getattr(p, "tensor_model_parallel", False) and tp > 1
            shape = [p.shape[0] * (tp if split else 1), p.shape[1]]
            full = 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(len(name) * 7919 + sum(map(ord, name))))
            if split:
                full = (torch.cat([h.chunk(tp)[rank] for h in full.chunk(2)]) if _stacked(name)
                        else full.chunk(tp)[rank])
            p.copy_(full)


def _full_tp_layout(tp: int, sp: bool, lora=None):
    from megatron.core import parallel_state

    from megatron_solo.parallel import initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=tp)
    model, config, _ = _build("full", sequence_parallel=sp, lora=lora)
    assert config.sequence_parallel == sp
    if lora is not None:
        _set_lora_b(model, tp)
    batch = _batch()
    logits = _model_logits(model, config, batch)
    _loss(logits, batch).backward()
    grads = {}
    for name, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        if getattr(p, "sequence_parallel", False):  # what finalize_model_grads does for SP-marked params
            torch.distributed.all_reduce(g, group=parallel_state.get_tensor_model_parallel_group())
        grads[name] = g
    # TP-split weights: gather their shards (dim 0 column-parallel, dim 1 row-parallel) to full tensors.
    full = {}
    for name, p in model.named_parameters():
        g = grads[name]
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            torch.distributed.all_gather(parts, g.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            if _stacked(name):  # each shard is [gate_r; up_r]: regroup to [gate; up]
                parts = [c for half in zip(*(q.chunk(2, dim=0) for q in parts)) for c in half]
            g = torch.cat(parts, dim=p.partition_dim)
        full[name] = g
    return logits.detach().clone(), full


def _recompute(**cfg):
    """``full``'s logits and gradients with activation recompute (the mask reaches re-run layers)."""
    model, config, _ = _build("full", **cfg)
    batch = _batch()
    logits = _model_logits(model, config, batch)
    _loss(logits, batch).backward()
    return logits.detach().clone(), _grads(model)


def _conversion(paths: dict) -> dict:
    """A Mistral base converted with ``full`` experts and without; the expert model trained a little
    (every weight perturbed), exported with --verify, and converted back with --verify."""
    from megatron_solo.checkpoint import save_checkpoint
    from megatron_solo.convert.megatron_io import (
        hf_to_megatron,
        init_conversion_parallel,
        megatron_logits,
        megatron_to_hf,
        verification_inputs,
    )
    from megatron_solo.convert.hf_export_files import generation_stop_ids
    from megatron_solo.eval.mcore_generation import SoloGenerator
    from megatron_solo.spec import MISTRAL_VOCAB
    from tests.test_convert_megatron import _load

    out = {}
    init_conversion_parallel()
    out["full_summary"] = hf_to_megatron(paths["base"], paths["ckpt_full"], tokenizer_model="mistral-common",
                                         vision_experts="full", verify=True, verify_logits=True)
    hf_to_megatron(paths["base"], paths["ckpt_dense"], tokenizer_model="mistral-common")
    ids, patches = verification_inputs(33031, with_image=True, seed=4)
    out["ids"], out["patches"] = ids, patches
    dense, _, _ = _load(paths["ckpt_dense"], 1, 1)
    out["dense_logits"] = megatron_logits(dense, ids, patches)
    model, model_args, info = _load(paths["ckpt_full"], 1, 1)
    out["full_logits"] = megatron_logits(model, ids, patches)
    out["model_args"] = model_args.to_dict()

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():  # experts now differ from their twins
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
    save_checkpoint(paths["ckpt_full"], 1, [model], model_args=model_args, padded_vocab_size=info["padded_vocab_size"],
                    tokenizer_model=info["tokenizer_model"])
    out["trained_logits"] = megatron_logits(model, ids, patches)[..., :33031]
    gen = ids[:1]
    for _ in range(4):
        nxt = megatron_logits(model, gen, patches[:6])[:, -1, :33031].argmax(-1, keepdim=True)
        gen = torch.cat([gen, nxt], dim=1)
    out["megatron_generation"] = gen
    # The same greedy answer through megatron-core's generation (static KV cache: prefill with the image,
    # then one token per step), what evaluate.py --load and in-loop eval decode with.
    generator = SoloGenerator(model, model_args, generation_stop_ids(MISTRAL_VOCAB))
    out["mcore_generation"] = generator.generate([generator.request(ids[0].tolist(), patches[:6], max_new_tokens=4)])[0]
    init_conversion_parallel()
    out["export_summary"] = megatron_to_hf(paths["ckpt_full"], paths["hf_full"], dtype="float32", verify=True,
                                           verify_logits=True)
    out["back_summary"] = hf_to_megatron(paths["hf_full"], paths["ckpt_back"], verify=True, verify_logits=True)
    return out


def _worker(paths):
    from megatron_solo.model.lora import LORA_TARGETS, LoraConfig
    from megatron_solo.parallel import initialize_model_parallel

    initialize_model_parallel()
    out = {experts: _check_against_reference(experts) for experts in ("ffn", "full")}
    out["recompute"] = {
        "none": _recompute(),
        "full": _recompute(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        "selective": _recompute(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
    }
    out["tp2_sp"] = _full_tp_layout(2, True)
    out["tp1"] = _full_tp_layout(1, False)
    # LoRA on every target (model/lora.py): the image twins get adapters of their own, split as their layers
    lora = LoraConfig(rank=4, alpha=8, targets=LORA_TARGETS)
    out["lora_tp2_sp"] = _full_tp_layout(2, True, lora)
    out["lora_tp1"] = _full_tp_layout(1, False, lora)
    out["conversion"] = _conversion(paths)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.helpers_convert import make_random_mistral

    root = tmp_path_factory.mktemp("experts")
    paths = {k: str(root / k) for k in ("base", "ckpt_full", "ckpt_dense", "hf_full", "ckpt_back")}
    make_random_mistral(paths["base"], seed=1)
    return [from_bytes(r) for r in run_distributed(as_bytes, 2, _worker, paths, timeout=900)], paths


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _assert_close(got, want, what):
    rel = _rel(got, want)
    assert rel <= REL, f"{what}: rel {rel:.2e} > {REL}"


@pytest.mark.parametrize("experts", ["ffn", "full"])
def test_expert_model_equals_per_token_selection_of_text_and_expert_weights(world, experts):
    r = world[0][0][experts]
    assert r["experts_differ"] and r["n_image"] > 0
    (logits, grads), (ref_logits, ref_grads) = r["model"], r["reference"]
    _assert_close(logits, ref_logits, "logits")
    assert set(grads) == set(ref_grads)
    expert_names = [n for n in grads if ".vision_" in n]
    assert expert_names and all(grads[n].abs().sum() > 0 for n in expert_names)
    for name in grads:
        _assert_close(grads[name], ref_grads[name], name)


def test_full_tp2_sequence_parallel_equals_tp1(world):
    logits1, grads1 = world[0][0]["tp1"]
    for rank in world[0]:
        logits2, grads2 = rank["tp2_sp"]
        _assert_close(logits2, logits1, "logits")
        for name, g in grads1.items():
            _assert_close(grads2[name], g, name)


def test_full_with_lora_adapters_on_the_twins_tp2_sequence_parallel_equals_tp1(world):
    logits1, grads1 = world[0][0]["lora_tp1"]
    adapters = [n for n in grads1 if n.endswith(("lora_a", "lora_b"))]
    twins = [n for n in adapters if ".vision_" in n]
    # every target and its image twin: qkv, proj, fc1, fc2 (x2) per layer, and the patch embedding
    assert len(twins) == len(adapters) // 2 - 1 > 0
    assert all(grads1[n].abs().sum() > 0 for n in adapters)
    assert not torch.equal(logits1, world[0][0]["tp1"][0])  # the adapters change the model
    for rank in world[0]:
        logits2, grads2 = rank["lora_tp2_sp"]
        _assert_close(logits2, logits1, "logits")
        for name in adapters:
            _assert_close(grads2[name], grads1[name], name)


@pytest.mark.parametrize("kind", ["full", "selective"])
def test_full_with_activation_recompute_gives_the_same_logits_and_grads(world, kind):
    logits, grads = world[0][0]["recompute"]["none"]
    logits_r, grads_r = world[0][0]["recompute"][kind]
    _assert_close(logits_r, logits, "logits")
    assert set(grads_r) == set(grads)
    for name, g in grads.items():
        _assert_close(grads_r[name], g, name)


def test_full_generates_through_megatron_core_kv_cache_as_without_cache(world):
    c = world[0][0]["conversion"]
    # the uncached greedy tokens (which the export's generate equals, test below) after an image prompt
    prompt = c["ids"].size(1)
    assert (c["ids"][0] == SOLO_IDS.vision_patch).sum() == 6
    assert c["mcore_generation"] == c["megatron_generation"][0, prompt:].tolist()


def test_full_converted_from_a_base_computes_exactly_what_the_base_does(world):
    c = world[0][0]["conversion"]
    assert c["model_args"]["vision_experts"] == "full"
    # --verify: every expert tensor bit-identical to its twin in the base; text logits = Mistral's own.
    # (the base's 21 HF tensors; each layer's expert reads 9: norm, q/k/v, o, norm, gate/up, down)
    assert c["full_summary"]["verify"]["tensors_checked"] == 21 + 2 * 9
    assert c["full_summary"]["verify"]["max_abs_logit_diff"] <= 1e-4
    # On images too: the same base converted without experts gives the same logits.
    _assert_close(c["full_logits"], c["dense_logits"], "logits with images")


@pytest.mark.usefixtures("plain_torch")
def test_export_routes_like_megatron_and_round_trips_bit_identically(world):
    import json
    import os

    from transformers import AutoModelForCausalLM

    out, paths = world
    c = out[0]["conversion"]
    cfg = json.load(open(os.path.join(paths["hf_full"], "config.json")))
    assert cfg["vision_experts"] == "full"
    # The export's --verify: 40 tensors bit-identical, logits with an image equal the Megatron model's;
    # converting the export back: bit-identical again.
    assert c["export_summary"]["verify"]["tensors_checked"] == 22 + 2 * 9
    assert c["back_summary"]["verify"]["tensors_checked"] == 22 + 2 * 9
    hf = AutoModelForCausalLM.from_pretrained(paths["hf_full"], trust_remote_code=True, dtype=torch.float32).eval()
    layer = hf.model.layers[0]
    assert not torch.equal(layer.vision_mlp.down_proj.weight, layer.mlp.down_proj.weight)
    with torch.no_grad():
        logits = hf(input_ids=c["ids"], vision_patches=c["patches"]).logits
    torch.testing.assert_close(logits, c["trained_logits"], rtol=1e-5, atol=1e-5)
    gen = hf.generate(input_ids=c["ids"][:1], vision_patches=c["patches"][:6], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, c["megatron_generation"])


def test_a_dense_export_config_is_unchanged():
    from megatron_solo.convert.hf_config import hf_config_from_model_args
    from megatron_solo.model import SoloModelArgs

    dense = hf_config_from_model_args(SoloModelArgs.from_preset("tiny").to_dict())
    assert "vision_experts" not in dense
    assert hf_config_from_model_args(SoloModelArgs.from_preset("tiny", vision_experts="ffn").to_dict())[
        "vision_experts"] == "ffn"


# ------------------------------------------------------------------------------------ the recipe
@pytest.fixture(scope="module")
def delta_tuning_run(world, digits_data, tmp_path_factory):
    """Mono-InternVL's recipe through the trainer: a stage with ``full`` experts starts (--finetune) from the
    dense checkpoint converted above and trains 3 iterations with --freeze-lm (distributed optimizer)."""
    from tests.test_training import _common, _run

    _, paths = world
    out = tmp_path_factory.mktemp("delta")
    log = _run(1, _common(digits_data, str(out), "--use-checkpoint-args", "--load", paths["ckpt_dense"], "--finetune",
                          "--vision-experts", "full", "--freeze-lm", "--use-distributed-optimizer",
                          "--transformer-impl", "local", "--train-iters", "3", "--save", str(out / "ck"),
                          "--save-interval", "1"))
    return out, log, paths


def test_finetune_from_a_dense_checkpoint_copies_the_twins_and_freeze_lm_trains_only_the_image_side(delta_tuning_run):
    import json

    from megatron_solo.parameter_names import is_vision_expert_parameter, text_twin_name
    from tests.helpers_checkpoint import checkpoint_tensors

    out, log, paths = delta_tuning_run
    assert "has no vision experts: each of the model's" in log and "starts as a copy of its text twin" in log
    info = json.load(open(out / "ck" / "iter_0000003" / "solo_checkpoint.json"))
    assert info["model_args"]["vision_experts"] == "full"  # the checkpoint records the choice
    dense = checkpoint_tensors(paths["ckpt_dense"] + "/iter_0000000")
    first, last = (checkpoint_tensors(out / "ck" / f"iter_{i:07d}") for i in (1, 3))
    image_side = {n for n in last if n == "vision_patch_embed.weight" or is_vision_expert_parameter(n)}
    assert len(image_side) == 1 + 6  # the patch embedding; the layers' (stacked): norm, QKV, proj, norm, fc1, fc2
    for name in last:
        if name in image_side:
            assert not torch.equal(first[name], last[name]), f"{name} did not train"
        else:  # every text weight bit-identical to the dense start, after 3 iterations
            assert torch.equal(dense[name], last[name]), f"{name} moved under --freeze-lm"
    # The experts started as copies of their twins: after one Adam step (lr 2e-3, weight decay 0.1) each
    # element is within ~lr of its twin (independently initialised weights differ by ~0.05).
    # (megatron-core's local spec stores the text norms under TE's fused names)
    stored = {"decoder.layers.input_layernorm.weight": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
              "decoder.layers.pre_mlp_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight"}
    for name in image_side - {"vision_patch_embed.weight"}:
        twin = stored.get(text_twin_name(name), text_twin_name(name))
        assert (first[name] - dense[twin]).abs().max() <= 3e-3, name
    # The optimizer state (fp32 main copy, Adam moments) holds the trainable tensors only.
    opt_keys = checkpoint_tensors(out / "ck" / "iter_0000003", optimizer=True)
    held = {k.split(".", 3)[3] for k in opt_keys}
    assert opt_keys and held == image_side, sorted(held ^ image_side)


def test_a_resume_cannot_add_or_drop_experts(world, digits_data, tmp_path):
    from megatron_solo.training.arguments import build_parser
    from megatron_solo.training.config import ArgumentError, build_train_config
    from tests.test_training import _common

    _, paths = world
    flags = _common(digits_data, str(tmp_path), "--use-checkpoint-args", "--load", paths["ckpt_dense"],
                    "--vision-experts", "full")
    with pytest.raises(ArgumentError) as exc:
        build_train_config(build_parser().parse_args(flags))
    assert "add --finetune" in str(exc.value) and "\n" not in str(exc.value)
    assert build_train_config(build_parser().parse_args(flags + ["--finetune"])).model.args.vision_experts == "full"
    with pytest.raises(ArgumentError) as exc:
        build_train_config(build_parser().parse_args(_common(digits_data, str(tmp_path), "--use-checkpoint-args",
                                                             "--load", paths["ckpt_full"], "--vision-experts", "ffn")))
    assert "drop --vision-experts" in str(exc.value)


def test_dry_run_counts_the_experts_and_the_same_flops(monkeypatch):
    from megatron_solo.training.dry_run import plan, report
    from tests.test_dry_run import WORLD, _config

    monkeypatch.setenv("WORLD_SIZE", str(WORLD))
    dense = plan(_config(["--tensor-model-parallel-size", "2"]))
    full = plan(_config(["--tensor-model-parallel-size", "2", "--vision-experts", "full", "--freeze-lm"]))
    # tiny: hidden 128, FFN 352, 4 heads / 2 groups of 32, 4 layers; per layer the MLP with its norm, the QKV,
    # the output projection and the input norm, written from the definition.
    h, f, q, kv, layers = 128, 352, 4 * 32, 2 * 32, 4
    per_layer = (3 * h * f + h) + h * (q + 2 * kv) + q * h + h
    assert full["vision_expert_parameters"] == layers * per_layer
    assert full["parameters_total"] == dense["parameters_total"] + layers * per_layer
    assert full["flops_per_step"] == dense["flops_per_step"]
    # --freeze-lm: the patch embedding and the experts (this TP rank's half of the split ones) train.
    trained = full["stages"][0]["trainable_parameters"]
    assert trained == h * 3072 + layers * (per_layer - 2 * h) // 2 + layers * 2 * h
    assert "vision experts (full): " in report(full, _config(["--vision-experts", "full"]).model.args)
