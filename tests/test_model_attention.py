"""SDPAFlexAttention (torch SDPA / FlexAttention) against megatron-core's local DotProductAttention.

Without gradients the module runs FlexAttention (or SDPA's causal kernel) on the CPU too; FlexAttention
has no CPU backward, so gradients here check the module's dense-SDPA CPU fallback, not FlexAttention's
backward (that runs on GPU only).

megatron-core's ``DotProductAttention`` is the reference: with a sliding window it builds the window
mask itself (unpacked case); for packed documents it takes the explicit block-diagonal mask (with the
window folded in, since its softmax *replaces* a given mask by the window mask). One world of one
rank runs every case, forward and backward, and a whole SoloModel built with each core attention.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_solo.testing.distributed import run_distributed
from tests.test_model_parallel import as_bytes, from_bytes

S, B, HEADS, GROUPS, HEAD_DIM = 200, 2, 4, 2, 16  # 200 > one 128-token FlexAttention block
DOC_LENGTHS = torch.tensor([[70, 5, 90, 35], [200, 0, 0, 0]])


def _attention_worker():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_solo.model import (
        SoloModelArgs,
        build_transformer_config,
        document_ids,
        packed_causal_mask,
    )
    from megatron_solo.model.attention import SDPAFlexAttention
    from megatron_solo.parallel import initialize_model_parallel

    initialize_model_parallel()
    args = SoloModelArgs.from_preset("tiny", hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                     num_query_groups=GROUPS, kv_channels=HEAD_DIM, sliding_window=48)
    cfg_window = build_transformer_config(args)
    cfg_full = build_transformer_config(dataclasses.replace(args, sliding_window=None))
    g = torch.Generator().manual_seed(0)
    q0 = torch.randn(S, B, HEADS, HEAD_DIM, generator=g)
    k0 = torch.randn(S, B, GROUPS, HEAD_DIM, generator=g)
    v0 = torch.randn(S, B, GROUPS, HEAD_DIM, generator=g)
    dout = torch.randn(S, B, HEADS * HEAD_DIM, generator=g)

    def run(module, mask):
        """[forward without grad (FlexAttention on CPU), forward with grad, dq, dk, dv]."""
        with torch.no_grad():
            out_nograd = module(q0, k0, v0, mask)
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        out = module(q, k, v, mask)
        (out * dout).sum().backward()
        return [out_nograd, out.detach(), q.grad, k.grad, v.grad]

    def dpa(cfg):
        return DotProductAttention(cfg, 1, AttnMaskType.causal, "self")

    def flex(cfg):
        return SDPAFlexAttention(cfg, 1, AttnMaskType.causal, "self")

    dense_window = packed_causal_mask(DOC_LENGTHS, S, cfg_window.window_size)
    dense_full = packed_causal_mask(DOC_LENGTHS, S, None)
    ids = document_ids(DOC_LENGTHS, S)
    out = {
        # unpacked, no window: SDPA's causal kernel vs megatron's causal softmax
        "unpacked": (run(flex(cfg_full), None), run(dpa(cfg_full), None)),
        # unpacked, sliding window: FlexAttention vs megatron's own window mask
        "unpacked_window": (run(flex(cfg_window), None), run(dpa(cfg_window), None)),
        # packed documents, with and without the window; both mask forms
        "packed_window_dense": (run(flex(cfg_window), dense_window), run(dpa(cfg_full), dense_window)),
        "packed_window_ids": (run(flex(cfg_window), ids), run(dpa(cfg_full), dense_window)),
        "packed_dense": (run(flex(cfg_full), dense_full), run(dpa(cfg_full), dense_full)),
        "packed_ids": (run(flex(cfg_full), ids), run(dpa(cfg_full), dense_full)),
    }
    # The window really matters here (the comparison can fail): full vs windowed outputs differ.
    out["window_changes_output"] = not torch.allclose(out["unpacked"][1][0], out["unpacked_window"][1][0], atol=1e-3)

    # A whole SoloModel: the sdpa_flex spec gives the dot_product spec's per-token losses.
    from megatron_solo.model import build_solo_model, model_forward_kwargs
    from megatron_solo.parallel import set_seed
    from tests.test_model_parallel import mixed_batch, model_args

    margs = model_args()
    config = build_transformer_config(margs)
    batch = mixed_batch()
    losses = {}
    for name, core, ids_mask in (("dot_product", "dot_product", False), ("sdpa_flex_dense", "sdpa_flex", False),
                                 ("sdpa_flex_ids", "sdpa_flex", True)):
        set_seed(1234)
        torch.manual_seed(1234)
        model = build_solo_model(margs, config, core_attention=core)
        with torch.no_grad():
            losses[name] = model(**model_forward_kwargs(batch, config, document_ids_mask=ids_mask)).clone()
    out["model_losses"] = losses
    return out


@pytest.fixture(scope="module")
def results():
    (r,) = run_distributed(as_bytes, 1, _attention_worker, timeout=600)
    return from_bytes(r)


@pytest.mark.parametrize("case", ["unpacked", "unpacked_window", "packed_window_dense", "packed_window_ids",
                                  "packed_dense", "packed_ids"])
def test_sdpa_flex_equals_megatron_dot_product_attention(results, case):
    got, ref = results[case]
    for name, a, b in zip(("output (no grad)", "output", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{case} {name}: {m}")


def test_the_sliding_window_is_exercised(results):
    assert results["window_changes_output"]


def test_solo_model_with_sdpa_flex_spec_equals_dot_product_spec(results):
    r = results["model_losses"]
    torch.testing.assert_close(r["sdpa_flex_dense"], r["dot_product"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["sdpa_flex_ids"], r["dot_product"], rtol=1e-5, atol=1e-5)
