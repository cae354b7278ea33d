"""In-process checks of the model package: presets, config, specs, FP8 refusal, masks, THD, loss rules."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
import torch

from megatron_solo.spec import SOLO_IDS, SOLO_VOCAB_SIZE
from megatron_solo.model import (
    SoloDotProductAttention,
    SoloModelArgs,
    SoloRMSNorm,
    build_transformer_config,
    fp8_thd_pad_multiple,
    get_layer_spec,
    model_forward_kwargs,
    packed_causal_mask,
    pad_lengths,
    position_ids_from_doc_lengths,
    solo_loss_func,
    te_available,
    to_thd_batch,
    use_te_default,
)
from tests.test_model_parallel import SEQ, make_doc, mixed_batch, pack


# ---------------------------------------------------------------- presets and config

def test_solo_7b_preset_is_mistral_7b_v0_1():
    from transformers import MistralConfig

    a = SoloModelArgs.from_preset("solo-7b")
    m = MistralConfig()  # transformers' defaults are Mistral-7B-v0.1's shapes
    assert (a.num_layers, a.hidden_size, a.ffn_hidden_size) == (m.num_hidden_layers, m.hidden_size, m.intermediate_size)
    assert (a.num_attention_heads, a.num_query_groups) == (m.num_attention_heads, m.num_key_value_heads)
    assert a.kv_channels == m.hidden_size // m.num_attention_heads == 128
    assert a.sliding_window == m.sliding_window == 4096
    assert a.max_position_embeddings == 32768  # Mistral-7B-v0.1's config.json (transformers' default is 4096*32)
    assert a.rotary_base == 10000 and a.norm_epsilon == 1e-5  # Mistral-7B-v0.1's config.json: 1e-5
    assert a.vocab_size == SOLO_VOCAB_SIZE == 33031 and a.patch_dim == 3072
    assert a.window_size == (4095, 0)  # HF: kv_idx > q_idx - 4096
    assert a.padded_vocab_size(1) == 33152 and a.padded_vocab_size(2) == 33280 and a.padded_vocab_size(8) == 33792


def test_presets_round_trip_through_json_and_tiny_is_small():
    for name in ("solo-7b", "tiny"):
        a = SoloModelArgs.from_preset(name)
        assert SoloModelArgs(**json.loads(json.dumps(dataclasses.asdict(a)))) == a
    t = SoloModelArgs.from_preset("tiny")
    assert t.vocab_size == 33031 and t.num_query_groups < t.num_attention_heads
    layer = (t.hidden_size * t.kv_channels * (t.num_attention_heads + 2 * t.num_query_groups)
             + t.num_attention_heads * t.kv_channels * t.hidden_size + 3 * t.hidden_size * t.ffn_hidden_size)
    total = 2 * t.padded_vocab_size() * t.hidden_size + t.num_layers * layer + 3072 * t.hidden_size
    assert 2e6 < total < 15e6
    assert SoloModelArgs.from_preset("tiny", num_layers=2).num_layers == 2
    with pytest.raises(ValueError, match="unknown preset"):
        SoloModelArgs.from_preset("llama")
    with pytest.raises(TypeError, match="unknown SoloModelArgs fields"):
        SoloModelArgs.from_preset("tiny", hidden=3)


def test_transformer_config_is_mistral_backbone_with_cpu_overrides_and_recompute():
    a = SoloModelArgs.from_preset("solo-7b")
    c = build_transformer_config(a, tensor_model_parallel_size=2, sequence_parallel=True,
                                 recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-5 and c.gated_linear_unit
    assert c.activation_func is torch.nn.functional.silu and not c.add_bias_linear and not c.add_qkv_bias
    assert (c.num_query_groups, c.kv_channels, c.window_size) == (8, 128, (4095, 0))
    assert c.sequence_parallel and c.tensor_model_parallel_size == 2 and c.calculate_per_token_loss
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == ("full", "uniform", 1)
    assert c.use_cpu_initialization and not c.gradient_accumulation_fusion  # CPU backend
    s = build_transformer_config(a, recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])
    assert s.recompute_granularity == "selective" and s.recompute_modules == ["core_attn", "mlp"]
    assert build_transformer_config(a, sequence_parallel=True).sequence_parallel is False  # TP=1
    assert build_transformer_config(a, bf16=True).params_dtype == torch.bfloat16
    assert build_transformer_config(SoloModelArgs.from_preset("tiny", sliding_window=None)).window_size is None


# ---------------------------------------------------------------- specs and FP8

def test_local_spec_is_chosen_without_te_and_uses_solo_modules():
    assert not te_available() or not torch.cuda.is_available()
    assert use_te_default() is False
    c = build_transformer_config(SoloModelArgs.from_preset("tiny"))
    for spec in (get_layer_spec(c), get_layer_spec(c, use_te=False)):
        sub = spec.submodules
        assert sub.input_layernorm is SoloRMSNorm and sub.pre_mlp_layernorm is SoloRMSNorm
        assert sub.self_attention.submodules.core_attention is SoloDotProductAttention
    with pytest.raises(ValueError, match="core_attention"):
        get_layer_spec(c, core_attention="flash")


@pytest.mark.skipif(te_available(), reason="checks the refusal when Transformer Engine is absent; it is importable here")
def test_te_spec_without_te_is_refused():
    c = build_transformer_config(SoloModelArgs.from_preset("tiny"))
    with pytest.raises(ValueError, match="Transformer Engine is not importable"):
        get_layer_spec(c, use_te=True)


@pytest.mark.skipif(use_te_default(), reason="checks the FP8 refusal without TE+GPU; this machine has both, so FP8 is allowed")
@pytest.mark.parametrize("fp8", ["hybrid", "e4m3"])
def test_fp8_without_te_is_refused_at_config_time_with_a_clear_message(fp8):
    with pytest.raises(ValueError) as e:
        build_transformer_config(SoloModelArgs.from_preset("tiny"), fp8=fp8, fp8_recipe="delayed")
    msg = str(e.value)
    assert "FP8" in msg and "Transformer Engine" in msg and fp8 in msg and "bf16" in msg


def test_fp8_settings_reach_the_config_and_the_spec_refuses_them_without_te():
    # use_te=True: the settings a TE machine would get (TransformerConfig itself accepts them on CPU).
    c = build_transformer_config(SoloModelArgs.from_preset("tiny"), use_te=True, bf16=True, fp8="hybrid",
                                 fp8_recipe="tensorwise", fp8_margin=1, fp8_amax_history_len=16,
                                 fp8_amax_compute_algo="max", fp8_wgrad=False)
    assert (c.fp8, c.fp8_recipe, c.fp8_margin, c.fp8_amax_history_len, c.fp8_amax_compute_algo, c.fp8_wgrad) == (
        "hybrid", "tensorwise", 1, 16, "max", False)
    if not use_te_default():
        with pytest.raises(ValueError, match="FP8 training"):
            get_layer_spec(c)
    with pytest.raises(ValueError, match="fp8 format"):
        build_transformer_config(SoloModelArgs.from_preset("tiny"), use_te=True, fp8="e5m2")
    with pytest.raises(ValueError, match="fp8 recipe"):
        build_transformer_config(SoloModelArgs.from_preset("tiny"), use_te=True, fp8="hybrid", fp8_recipe="nope")


def test_fp8_thd_padding_rule():
    cfg = lambda **kw: types.SimpleNamespace(**{"fp8": None, "fp8_recipe": "delayed", "context_parallel_size": 1, **kw})  # noqa: E731
    assert fp8_thd_pad_multiple(cfg()) == 1
    assert fp8_thd_pad_multiple(cfg(fp8="hybrid")) == 16
    assert fp8_thd_pad_multiple(cfg(fp8="e4m3", fp8_recipe="mxfp8")) == 32
    assert fp8_thd_pad_multiple(cfg(context_parallel_size=3)) == 6
    assert fp8_thd_pad_multiple(cfg(fp8="hybrid", context_parallel_size=4)) == 16
    assert fp8_thd_pad_multiple(cfg(fp8="hybrid", context_parallel_size=3)) == 48
    assert pad_lengths(torch.tensor([1, 16, 17, 0]), 16).tolist() == [16, 16, 32, 0]


# ---------------------------------------------------------------- packing: masks, positions, THD

def test_packed_causal_mask_matches_brute_force_with_window():
    lengths = torch.tensor([[5, 3, 8], [16, 0, 0]])
    for window in (None, (2, 0)):
        m = packed_causal_mask(lengths, 16, window)
        assert m.shape == (2, 1, 16, 16) and m.dtype == torch.bool
        for b, row in enumerate(lengths.tolist()):
            doc = np.repeat(np.arange(len(row)), row)
            for i in range(16):
                for j in range(16):
                    ok = doc[i] == doc[j] and j <= i and (window is None or i - j <= window[0])
                    assert bool(m[b, 0, i, j]) == (not ok), (b, i, j, window)
    with pytest.raises(ValueError, match="sum to the sequence length"):
        packed_causal_mask(torch.tensor([[5, 3]]), 16)


def test_position_ids_restart_per_document_and_forward_kwargs():
    batch = mixed_batch()
    torch.testing.assert_close(position_ids_from_doc_lengths(batch["doc_lengths"], SEQ), batch["position_ids"])
    c = build_transformer_config(SoloModelArgs.from_preset("tiny", sliding_window=12))
    kw = model_forward_kwargs(batch, c)
    assert kw["packed_seq_params"] is None and kw["vision_patches"] is batch["patches"]
    torch.testing.assert_close(kw["attention_mask"], packed_causal_mask(batch["doc_lengths"], SEQ, (11, 0)))


def test_thd_layout_pads_each_document_and_keeps_patch_order():
    batch = mixed_batch()
    thd = to_thd_batch(batch, pad_multiple=16, total_multiple=32)
    real = batch["doc_lengths"][batch["doc_lengths"] > 0].long()
    T = thd["tokens"].size(1)
    assert T % 32 == 0 and T >= int(pad_lengths(real, 16).sum())
    cu, cup = thd["cu_seqlens"].long(), thd["cu_seqlens_padded"].long()
    assert torch.equal(cu[1:len(real) + 1] - cu[:len(real)], real)
    assert bool(((cup[1:] - cup[:-1]) % 16 == 0).all())
    for k in range(len(real)):  # each document starts at its padded offset and keeps its tokens
        n = int(real[k])
        src = batch["tokens"].reshape(-1)[int(cu[k]) - 0:int(cu[k]) + n]
        assert torch.equal(thd["tokens"][0, int(cup[k]):int(cup[k]) + n], src)
        assert torch.equal(thd["position_ids"][0, int(cup[k]):int(cup[k]) + n], torch.arange(n))
    pad = torch.ones(T, dtype=torch.bool)
    pad[thd["thd_index"]] = False
    assert not bool(thd["loss_mask"][0, pad].any()) and not bool((thd["tokens"][0, pad] == SOLO_IDS.vision_patch).any())
    assert float(thd["loss_mask"].sum()) == float(batch["loss_mask"].sum())
    # The k-th <vpatch> is the same token in both layouts, so patches[k] stays with it.
    orig = (batch["tokens"].reshape(-1) == SOLO_IDS.vision_patch).nonzero().squeeze(1)
    moved = (thd["tokens"][0] == SOLO_IDS.vision_patch).nonzero().squeeze(1)
    assert torch.equal(thd["thd_index"][orig], moved) and thd["patches"] is batch["patches"]
    kw = model_forward_kwargs(thd, types.SimpleNamespace(window_size=None))
    p = kw["packed_seq_params"]
    assert p.qkv_format == "thd" and kw["attention_mask"] is None and p.max_seqlen_q == thd["max_seqlen"]


# ---------------------------------------------------------------- loss-mask rules

def _mask_at(batch, row, token_pred):
    """Loss-mask values at label positions whose label satisfies ``token_pred``."""
    sel = token_pred(batch["labels"][row])
    return batch["loss_mask"][row][sel]


def test_loss_mask_rules_on_constructed_documents():
    chat = make_doc("chat_image", 3)
    b = pack([[chat]])
    toks, roles = np.array(chat[0]), np.array(chat[1])
    n = len(toks)
    m = b["loss_mask"][0]
    # Labels are the next token: position t predicts toks[t+1].
    for t in range(n - 1):
        nxt, role = toks[t + 1], roles[t + 1]
        expect = role == 2 and (nxt < 32000 or nxt == SOLO_IDS.im_end)
        assert bool(m[t]) == expect, (t, nxt, role)
    # Each rule has a case: an assistant token counts, and so does the <|im_end|> closing the assistant
    # turn (the stop token); the user turn, image tokens (patches and markers), the other chat markers
    # >= 32000 (even inside the assistant turn), the last token and padding do not.
    assert m[:n - 1].sum() == 7 + 1  # the 7 words of the assistant turn and its <|im_end|>
    im_end_assistant = int(np.nonzero(toks == SOLO_IDS.im_end)[0][-1])
    assert roles[im_end_assistant] == 2 and m[im_end_assistant - 1] == 1
    assert float(m[n - 1:].sum()) == 0.0  # the document's last token and the padding
    assert not bool(_mask_at(b, 0, lambda l: l == SOLO_IDS.vision_patch).any())
    assert not bool(_mask_at(b, 0, lambda l: (l >= 32000) & (l != SOLO_IDS.im_end)).any())
    # 'all' trains every text role (the user's words too) but still never image tokens or specials.
    ball = pack([[chat]], loss_role="all")
    assert ball["loss_mask"][0].sum() == 7 + 4 + 2  # assistant words + user words + both <|im_end|>
    assert not bool(_mask_at(ball, 0, lambda l: (l >= 32000) & (l != SOLO_IDS.im_end)).any())
    with pytest.raises(ValueError, match="unknown loss role"):
        pack([[chat]], loss_role="robot")


def test_loss_func_ignores_masked_tokens_and_is_exact_over_micro_batches():
    b1, b2 = mixed_batch(0), mixed_batch(7)
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.rand(b1["tokens"].shape, generator=g), torch.rand(b2["tokens"].shape, generator=g)
    s1, n1, r1 = solo_loss_func(b1, l1)
    # Huge losses where the mask is 0 change nothing.
    s1b, n1b, _ = solo_loss_func(b1, torch.where(b1["loss_mask"] > 0, l1, torch.full_like(l1, 1e6)))
    assert torch.equal(s1, s1b) and int(n1) == int(n1b)
    s2, n2, r2 = solo_loss_func(b2, l2)
    # Sum of sums / sum of counts is the mean over all loss tokens of both micro-batches.
    mean = torch.cat([l1[b1["loss_mask"] > 0], l2[b2["loss_mask"] > 0]]).mean()
    torch.testing.assert_close((s1 + s2) / (n1 + n2), mean)
    total = r1["lm loss"] + r2["lm loss"]
    torch.testing.assert_close(total[0] / total[1], mean)
    assert n1.dtype == torch.int and set(r1) == {"lm loss", "image-doc loss", "text-doc loss"}


def test_sliding_window_mask_matches_megatron_core():
    from megatron.core.transformer.utils import get_sliding_window_causal_mask

    from megatron_solo.model.specs import sliding_window_causal_mask

    for sq, sk, w in ((10, 10, (3, 0)), (4, 10, (2, 0)), (10, 10, (3, 2)), (7, 7, (0, 0))):
        assert torch.equal(sliding_window_causal_mask(sq, sk, w, "cpu"), get_sliding_window_causal_mask(sq, sk, w))
