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


def _build(vision_experts: str, seed: int = 1234, **cfg):
    from megatron.core import parallel_state

    from megatron_solo.model import build_solo_model, build_transformer_config
    from megatron_solo.parallel import set_seed

    args = _args(vision_experts)
    config = build_transformer_config(
        args, tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(), **cfg)
    set_seed(seed)
    torch.manual_seed(seed)
    return build_solo_model(args, config, padded_vocab_size=args.padded_vocab_size(2)), config, args


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


def _full_tp_layout(tp: int, sp: bool):
    from megatron.core import parallel_state

    from megatron_solo.parallel import initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=tp)
    model, config, _ = _build("full", sequence_parallel=sp)
    assert config.sequence_parallel == sp
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
            if name.endswith("linear_fc1.weight"):  # each shard is [gate_r; up_r]: regroup to [gate; up]
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


def _worker():
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
    return out


@pytest.fixture(scope="module")
def world():
    return [from_bytes(r) for r in run_distributed(as_bytes, 2, _worker, timeout=600)]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _assert_close(got, want, what):
    rel = _rel(got, want)
    assert rel <= REL, f"{what}: rel {rel:.2e} > {REL}"


@pytest.mark.parametrize("experts", ["ffn", "full"])
def test_expert_model_equals_per_token_selection_of_text_and_expert_weights(world, experts):
    r = world[0][experts]
    assert r["experts_differ"] and r["n_image"] > 0
    (logits, grads), (ref_logits, ref_grads) = r["model"], r["reference"]
    _assert_close(logits, ref_logits, "logits")
    assert set(grads) == set(ref_grads)
    expert_names = [n for n in grads if ".vision_" in n]
    assert expert_names and all(grads[n].abs().sum() > 0 for n in expert_names)
    for name in grads:
        _assert_close(grads[name], ref_grads[name], name)


def test_full_tp2_sequence_parallel_equals_tp1(world):
    logits1, grads1 = world[0]["tp1"]
    for rank in world:
        logits2, grads2 = rank["tp2_sp"]
        _assert_close(logits2, logits1, "logits")
        for name, g in grads1.items():
            _assert_close(grads2[name], g, name)


@pytest.mark.parametrize("kind", ["full", "selective"])
def test_full_with_activation_recompute_gives_the_same_logits_and_grads(world, kind):
    logits, grads = world[0]["recompute"]["none"]
    logits_r, grads_r = world[0]["recompute"][kind]
    _assert_close(logits_r, logits, "logits")
    assert set(grads_r) == set(grads)
    for name, g in grads.items():
        _assert_close(grads_r[name], g, name)
