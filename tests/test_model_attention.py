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
        if name == "sdpa_flex_ids":  # the layers' one mask cache: one block mask made for the step
            cores = [m for m in model.modules() if isinstance(m, SDPAFlexAttention)]
            out["mask_cache"] = (len(cores), len({id(c._masks) for c in cores}), list(cores[0]._masks._made))
    out["model_losses"] = losses
    out["block_mask"] = _block_mask_case(args)
    return out


# The GPU path's block mask, built here on the CPU by the same code: bidirectional image blocks in packed
# documents, long enough (4096) that the rule spans many 128-token tiles and several slabs.
LONG, LONG_WINDOW = 4096, 300


def _long_batch():
    """Two rows of LONG tokens: documents with images of several grids (some wider than the window, one
    without row separators), text between them, one document cut at the row's end, padding."""
    from megatron_solo.spec import SOLO_IDS as T

    g = torch.Generator().manual_seed(5)

    def image(rows, cols, sep=True):
        t = [T.vision_start]
        for r in range(rows):
            t += [T.vision_patch] * cols + ([T.vision_row_sep] if sep and r < rows - 1 else [])
        return t + [T.vision_end]

    def text(n):
        return torch.randint(3, 32000, (n,), generator=g).tolist()

    docs = [[T.bos, *text(40), *image(12, 16), *text(200), *image(3, 5), *text(90)],
            [T.bos, *text(300), *image(20, 30, sep=False), *text(25), *image(1, 2), *text(700)],
            [T.bos, *image(8, 8), *text(1500)],
            [T.bos, *text(1000), *image(24, 24), *text(1200)],
            [T.bos, *text(5), *image(2, 3), *image(4, 4), *text(333)]]
    rows, lengths = [], []
    for row_docs in (docs[:3], docs[3:]):
        toks, ls = [], []
        for d in row_docs:
            d = d[:LONG - len(toks)]
            toks += d
            ls.append(len(d))
        ls.append(LONG - len(toks))
        rows.append(toks + [0] * (LONG - len(toks)))
        lengths.append(ls + [0] * (4 - len(ls)))
    return {"tokens": torch.tensor(rows), "doc_lengths": torch.tensor(lengths, dtype=torch.int32)}


def _block_mask_case(args):
    """What ``SDPAFlexAttention`` builds for the GPU from [2, b, s] ids: the largest tensor any torch op
    makes meanwhile, the tensors the BlockMask holds, and its element-level form against the reference."""
    from megatron.core.transformer.enums import AttnMaskType
    from torch.utils._pytree import tree_leaves
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_solo.model import build_transformer_config, model_forward_kwargs
    from megatron_solo.model.attention import SLAB_ELEMENTS, SDPAFlexAttention
    from tests.test_image_choices import reference_blocks_and_positions, reference_mask

    class LargestStorage(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.nbytes = 0

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            result = func(*a, **(kw or {}))
            for t in tree_leaves(result):
                if isinstance(t, torch.Tensor):
                    self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
            return result

    margs = dataclasses.replace(args, sliding_window=LONG_WINDOW, image_attention="bidirectional")
    config = build_transformer_config(margs)
    batch = _long_batch()
    b = batch["tokens"].size(0)
    ids = model_forward_kwargs(batch, config, document_ids_mask=True, model_args=margs)["attention_mask"]
    module = SDPAFlexAttention(config, 1, AttnMaskType.causal, "self")
    with LargestStorage() as seen:
        bm = module._block_mask(ids, b, LONG, LONG, torch.device("cpu"))
    held = [t for t in bm.as_tuple(flatten=True) if isinstance(t, torch.Tensor)]
    held += [c.cell_contents for c in bm.mask_mod.__closure__ or () if isinstance(c.cell_contents, torch.Tensor)]

    # Element level: a full tile admits all its entries, a partial one what mask_mod admits, others none.
    def tiles(num, idx):
        n_kv = idx.size(-1)
        dense = torch.zeros(*idx.shape[:-1], n_kv + 1, dtype=torch.bool)
        dense.scatter_(-1, torch.where(torch.arange(n_kv) < num[..., None], idx.long(), n_kv), True)
        return dense[..., :n_kv, None, None].expand(-1, -1, -1, -1, 128, 128).permute(0, 1, 2, 4, 3, 5) \
            .reshape(b, 1, idx.size(-2) * 128, n_kv * 128)[:, 0, :LONG, :LONG]

    full = tiles(bm.full_kv_num_blocks, bm.full_kv_indices)
    partial = tiles(bm.kv_num_blocks, bm.kv_indices)
    i = torch.arange(LONG)
    rule = bm.mask_mod(torch.arange(b)[:, None, None], 0, i[None, :, None], i[None, None, :])
    blocks, _ = reference_blocks_and_positions(batch["tokens"], batch["doc_lengths"],
                                               [(0, 0)] * int((batch["tokens"] == 32001).sum()))
    ref = reference_mask(batch["tokens"], batch["doc_lengths"], blocks, LONG_WINDOW, bidirectional=True)
    return {"largest_bytes": seen.nbytes, "slab_elements": SLAB_ELEMENTS, "held_numel": [t.numel() for t in held],
            "tiles": (b, bm.kv_indices.size(-2), bm.kv_indices.size(-1)),
            "n_full": int(bm.full_kv_num_blocks.sum()), "n_partial": int(bm.kv_num_blocks.sum()),
            "equal": bool(torch.equal(full | (partial & rule), ref)), "no_overlap": not bool((full & partial).any()),
            "reference_allowed": int(ref.sum()), "beyond_window": bool((ref & (i[:, None] - i[None, :] >= LONG_WINDOW)).any())}


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
    # ... with the block mask made once for the step and shared by the layers, not once per layer
    n_layers, n_caches, made = results["mask_cache"]
    assert n_layers > 1 and n_caches == 1 and [k[0] for k in made] == ["block"], results["mask_cache"]


def test_flex_block_mask_never_holds_a_dense_square_and_equals_the_reference(results):
    """The GPU path's block mask (bidirectional image blocks in packed documents, [2, b, s] ids), built on
    the CPU by the same code: no torch op makes a tensor of a dense [s, s] mask's size (torch's eager
    create_block_mask makes [b, 1, s, s]), the BlockMask holds block-level indices and the [b, s] ids only,
    and its tiles admit exactly the plain reference mask (test_image_choices.reference_mask)."""
    r = results["block_mask"]
    b, n_q, n_kv = r["tiles"]
    assert (n_q, n_kv) == (LONG // 128, LONG // 128)
    assert r["largest_bytes"] <= r["slab_elements"] < LONG * LONG // 2, r["largest_bytes"]
    assert max(r["held_numel"]) <= max(b * n_q * n_kv, 2 * b * LONG), r["held_numel"]
    assert r["equal"] and r["no_overlap"]
    # block-sparse: most tiles skipped, full tiles skip the rule, and image blocks reach past the window
    assert 0 < r["n_full"] and 0 < r["n_partial"] and r["n_full"] + r["n_partial"] < b * n_q * n_kv / 4
    assert r["beyond_window"] and r["reference_allowed"] > 0
