"""The image choices (``image_attention``, ``image_positions``) against a plain reference written here.

The reference is the definition (docs/MODEL.md), computed token by token: the image blocks and the
multimodal positions by a scan of each document segment, an explicit [s, s] boolean mask, the rotary
angles of each channel from its position component, and a plain PyTorch forward of the SoloModel's own
weights. The batch packs several documents per row: images of different grids with text between them
(one laid out without row separators, ``--row-separator off``), a video clip, a document that starts
inside a cut image, a text-only chat, trailing padding.
SoloModel (megatron-core, both local attention backends) must give the reference's logits (fp32),
per-token losses and gradients. One world of one rank runs every case.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_solo.spec import ASSISTANT, IMAGE, SOLO_IDS, USER
from megatron_solo.testing.distributed import run_distributed
from tests.test_model_parallel import WINDOW, as_bytes, from_bytes, image_patches, make_doc, pack

IDS = SOLO_IDS
INNER = (IDS.vision_patch, IDS.vision_row_sep, IDS.vision_frame_sep)
LAYOUT = (IDS.vision_start, *INNER, IDS.vision_end)
SEQ = 128


# ------------------------------------------------------------------------------------------ batch
def _image(rows, cols, seed, sep=True):
    """(tokens, patches, coords) of one image in SOLO's layout (row separators between rows; none
    without ``sep``: SAIL's layout, ``--row-separator off``)."""
    p, r, c = image_patches(seed % 2, 32 * cols, 32 * rows)
    toks = [IDS.vision_start]
    coords = []
    for i in range(rows):
        toks += [IDS.vision_patch] * cols
        coords += [(i, j) for j in range(cols)]
        if sep and i < rows - 1:
            toks.append(IDS.vision_row_sep)
    return toks + [IDS.vision_end], p, coords


def _doc(parts, seed):
    """A document from parts: ('text', n), ('image', rows, cols), ('image_off', rows, cols): without row
    separators, ('video', rows, cols, frames)."""
    g = np.random.default_rng(seed)
    toks, roles, patches, coords = [IDS.bos], [ASSISTANT], [], []
    for k, part in enumerate(parts):
        if part[0] == "text":
            toks += [int(x) for x in g.integers(3, 32000, part[1])]
            roles += [ASSISTANT] * part[1]
        else:
            frames = part[3] if part[0] == "video" else 1
            block = [IDS.vision_start]
            for f in range(frames):
                t, p, c = _image(part[1], part[2], seed + k + f, sep=part[0] != "image_off")
                block += t[1:-1] + ([IDS.vision_frame_sep] if f < frames - 1 else [])
                patches.append(p)
                coords += c
            block.append(IDS.vision_end)
            toks += block
            roles += [IMAGE] * len(block)
    return toks, roles, np.concatenate(patches) if patches else np.zeros((0, 3072), np.uint8), coords


def choices_batch():
    """Row 0: text, a 2x3 image, text, a 1x2 image, text | a text chat. Row 1: a 3x2 image without row
    separators, text |
    the tail of a cut 2x2 image (its last row and </vision>), text, a 2-frame 1x2 video, text | padding."""
    d0 = _doc([("text", 3), ("image", 2, 3), ("text", 4), ("image", 1, 2), ("text", 5)], 1)
    t, r, p = make_doc("text", 2)
    d1 = (t, r, p, [])
    d2 = _doc([("image_off", 3, 2), ("text", 6)], 3)
    full = _doc([("image", 2, 2), ("text", 4), ("video", 1, 2, 2), ("text", 3)], 4)
    cut = full[0].index(IDS.vision_row_sep) + 1  # the segment starts with the image's second row
    d3 = (full[0][cut:], full[1][cut:], full[2][2:], full[3][2:])
    batch = pack([[d[:3] for d in (d0, d1)], [d[:3] for d in (d2, d3)]], seq=SEQ)
    coords = [c for d in (d0, d1, d2, d3) for c in d[3]]
    batch["patch_coords"] = torch.tensor(coords, dtype=torch.long).reshape(-1, 2)
    assert batch["patch_coords"].shape[0] == batch["patches"].shape[0]
    return batch


# ------------------------------------------------------------------------- the definition, by hand
def reference_blocks_and_positions(tokens, doc_lengths, coords):
    """Per row: block id of each token (0: none) and its (t, h, w) position, by scanning each segment."""
    b, s = tokens.shape
    blocks = torch.zeros(b, s, dtype=torch.long)
    pos = torch.zeros(3, b, s, dtype=torch.long)
    k = 0  # next patch
    for row in range(b):
        off, next_block = 0, 1
        for n in [int(x) for x in doc_lengths[row] if x > 0]:
            p, cur, st, top, last = 0, None, None, 0, None  # text position, open block, block start ...
            for i in range(off, off + n):
                t = int(tokens[row, i])
                if t in LAYOUT:
                    if cur is None or t == IDS.vision_start:
                        cur, next_block = next_block, next_block + 1
                    blocks[row, i] = cur
                    if t == IDS.vision_end:
                        cur = None
                if t in INNER:
                    if st is None:
                        st, top, last, frame = p, 0, None, 0
                    if t == IDS.vision_patch:
                        r, c = coords[k]
                        k += 1
                        last = (r, c)
                        f = frame
                    else:  # a separator: the patch before it, one column right
                        f, (r, c) = (frame, (last[0], last[1] + 1)) if last is not None else (0, (0, 0))
                        if t == IDS.vision_frame_sep:
                            frame += 1
                    pos[:, row, i] = torch.tensor([st + f, st + r, st + c])
                    top = max(top, f, r, c)
                else:
                    if st is not None:
                        p, st = st + top + 1, None
                    pos[:, row, i] = p
                    p += 1
            off += n
    return blocks, pos


def reference_mask(tokens, doc_lengths, blocks, window, bidirectional):
    """Explicit [b, s, s] bool (True = may attend): same document and causal within the window, or (when
    bidirectional) the same image block."""
    b, s = tokens.shape
    doc = torch.stack([torch.repeat_interleave(torch.arange(doc_lengths.size(1)), row.long()) for row in doc_lengths])
    q, k = torch.arange(s)[:, None], torch.arange(s)[None, :]
    causal = (k <= q) & (q - k < window)
    same_doc = doc[:, :, None] == doc[:, None, :]
    same_block = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] > 0)
    return same_doc & (causal[None] | (same_block if bidirectional else False))


def _rotate(x, angles):
    """x [b, s, heads, d]; angles [b, s, d/2]: non-interleaved RoPE (pairs i, i + d/2)."""
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_forward(P, a, batch, allowed, pos3, section):
    """Logits [b, s, V] of the weights ``P`` (megatron-core's names), in plain PyTorch (RMSNorm, GQA,
    RoPE, SwiGLU)."""
    tokens = batch["tokens"]
    b, s = tokens.shape
    d, nq, ng, h = a.kv_channels, a.num_attention_heads, a.num_query_groups, a.hidden_size
    x = P["embedding.word_embeddings.weight"][tokens]
    mean = torch.tensor([0.485, 0.456, 0.406]).repeat_interleave(1024)
    std = torch.tensor([0.229, 0.224, 0.225]).repeat_interleave(1024)
    vis = ((batch["patches"].float() / 255 - mean) / std) @ P["vision_patch_embed.weight"].t()
    x = x.index_put(torch.nonzero(tokens == IDS.vision_patch, as_tuple=True), vis, accumulate=True)
    inv_freq = 1.0 / a.rotary_base ** (torch.arange(0, d, 2).float() / d)  # [d/2]
    comp = torch.repeat_interleave(torch.arange(3), torch.tensor(section))  # channel pair -> component
    angles = pos3.float()[comp].permute(1, 2, 0) * inv_freq  # [b, s, d/2]

    def norm(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + a.norm_epsilon) * w

    bias = torch.zeros(b, 1, s, s).masked_fill(~allowed[:, None], float("-inf"))
    for i in range(a.num_layers):
        L = {k[len(f"decoder.layers.{i}."):]: v for k, v in P.items() if k.startswith(f"decoder.layers.{i}.")}
        y = norm(x, L["input_layernorm.weight"])
        qkv = (y @ L["self_attention.linear_qkv.weight"].t()).view(b, s, ng, nq // ng + 2, d)
        q = qkv[:, :, :, :-2].reshape(b, s, nq, d)
        k = qkv[:, :, :, -2].repeat_interleave(nq // ng, dim=2)
        v = qkv[:, :, :, -1].repeat_interleave(nq // ng, dim=2)
        q, k = _rotate(q, angles), _rotate(k, angles)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5 + bias
        o = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(b, s, nq * d)
        x = x + o @ L["self_attention.linear_proj.weight"].t()
        y = norm(x, L["pre_mlp_layernorm.weight"])
        gate, up = (y @ L["mlp.linear_fc1.weight"].t()).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ L["mlp.linear_fc2.weight"].t()
    logits = norm(x, P["decoder.final_layernorm.weight"]) @ P["output_layer.weight"].t()
    return logits.masked_fill(torch.arange(logits.size(-1)) >= a.vocab_size, float("-inf"))


# ------------------------------------------------------------------------------------------ world
CASES = [("causal", "1d"), ("bidirectional", "1d"), ("causal", "mrope"), ("bidirectional", "mrope")]
# (backend, FlexAttention's integer mask form) per case: megatron's dot product for every case; the
# sdpa_flex spec (dense mask, and document + block ids) with both choices on (the positions are the same
# code on every backend).
BACKENDS = {case: [("dot_product", False)] for case in CASES}
BACKENDS[("bidirectional", "mrope")] += [("sdpa_flex", False), ("sdpa_flex", True)]
RUNS = [(*case, *backend) for case in CASES for backend in BACKENDS[case]]


def _world(paths):
    import dataclasses

    from megatron_solo.model import build_solo_model, build_transformer_config, model_forward_kwargs, solo_loss_func
    from megatron_solo.parallel import initialize_model_parallel, set_seed
    from tests.test_model_parallel import model_args

    initialize_model_parallel()
    batch = choices_batch()
    blocks, pos3 = reference_blocks_and_positions(batch["tokens"], batch["doc_lengths"], batch["patch_coords"].tolist())
    out = {"blocks": blocks, "pos3": pos3, "batch": batch}
    base = model_args()
    for attention, positions in CASES:
        a = dataclasses.replace(base, image_attention=attention, image_positions=positions)
        config = build_transformer_config(a)
        for core, ids_mask in BACKENDS[(attention, positions)]:
            set_seed(1234)
            torch.manual_seed(1234)
            model = build_solo_model(a, config, core_attention=core)
            kw = model_forward_kwargs(batch, config, document_ids_mask=ids_mask, model_args=a)
            r = {}
            if ids_mask:  # FlexAttention's block mask runs forward-only on the CPU (backward: dense SDPA)
                with torch.no_grad():
                    r["logits"] = model(**dict(kw, labels=None)).detach().clone()
            losses = model(**kw)
            loss_sum, n, _ = solo_loss_func(batch, losses)
            (loss_sum / n).backward()
            r["losses"] = losses.detach().clone()
            params = dict(model.named_parameters())
            r["grads"] = {k: p.grad.detach().clone() for k, p in params.items()}
            if not ids_mask:  # (with ids, the logits compared are FlexAttention's)
                with torch.no_grad():
                    r["logits"] = model(**dict(kw, labels=None)).detach().clone()
            out[(attention, positions, core, ids_mask)] = r
        # The reference, once per case, on copies of the same weights (one seed: every backend's).
        section = a.mrope_section or [a.kv_channels // 2, 0, 0]
        pos = pos3 if positions == "mrope" else batch["position_ids"][None].expand(3, -1, -1)
        allowed = reference_mask(batch["tokens"], batch["doc_lengths"], blocks, WINDOW, attention == "bidirectional")
        ref_params = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
        logits = reference_forward(ref_params, a, batch, allowed, pos, section)
        ref_losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view_as(batch["labels"])
        mask = batch["loss_mask"]
        ((ref_losses * mask).sum() / mask.sum()).backward()
        out[(attention, positions, "reference")] = dict(
            logits=logits.detach(), losses=ref_losses.detach(),
            grads={k: p.grad.detach().clone() for k, p in ref_params.items()})
    out["export"] = _export(paths)  # in the same process: one start of megatron-core for the module
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, solo_tokenizer):
    root = tmp_path_factory.mktemp("choices_export")
    paths = {"ckpt": str(root / "ckpt"), "hf": str(root / "hf"), "tokenizer": solo_tokenizer}
    (r,) = run_distributed(as_bytes, 1, _world, paths, timeout=600)
    return paths, from_bytes(r)


def test_reference_scan_and_library_agree_on_blocks_and_positions(world):
    """The library's vectorised rule (model/image_blocks.py) equals the token-by-token scan."""
    world = world[1]
    from megatron_solo.model.batch import document_ids
    from megatron_solo.model.image_blocks import ImageTokens, image_block_ids, mrope_position_ids

    batch = world["batch"]
    ids = ImageTokens.from_patch_id(IDS.vision_patch)
    doc = document_ids(batch["doc_lengths"], SEQ)
    got = image_block_ids(batch["tokens"], doc, ids)
    # same partition of the tokens into blocks (the numbering may differ)
    ref = world["blocks"]
    for row in range(got.size(0)):
        pairs = {(int(x), int(y)) for x, y in zip(got[row], ref[row])}
        assert len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})
        assert all((x == 0) == (y == 0) for x, y in pairs)
    assert int(ref.max()) >= 3  # several blocks per row, the cut one included
    torch.testing.assert_close(mrope_position_ids(batch["tokens"], batch["patch_coords"], doc, ids), world["pos3"],
                               rtol=0, atol=0)
    # a text-only document (row 0's second, a chat) gets its 1d positions on all three components
    n0 = int(batch["doc_lengths"][0, 0])
    torch.testing.assert_close(world["pos3"][:, 0, n0:], batch["position_ids"][0, n0:].expand(3, -1))


@pytest.mark.parametrize("run", RUNS, ids=lambda r: "-".join(map(str, r[:3])) + ("-ids" if r[3] else ""))
def test_choice_equals_plain_reference_logits_loss_and_grads(world, run):
    world = world[1]
    r, ref = world[run], world[(*run[:2], "reference")]
    valid = torch.isfinite(ref["logits"])  # the padded vocabulary's rows: masked out in both
    assert not valid.all() and bool((r["logits"][~valid] <= torch.finfo(torch.float32).min / 2).all())
    torch.testing.assert_close(r["logits"][valid], ref["logits"][valid], rtol=1e-5, atol=1e-5)
    mask = world["batch"]["loss_mask"] > 0
    torch.testing.assert_close(r["losses"][mask], ref["losses"][mask], rtol=1e-5, atol=1e-5)
    assert r["grads"].keys() == ref["grads"].keys()
    for k in r["grads"]:
        torch.testing.assert_close(r["grads"][k], ref["grads"][k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_each_choice_changes_the_logits(world):
    """So that the comparisons above can fail: every switch moves the image documents' logits."""
    world = world[1]
    ref = world[("causal", "1d", "dot_product", False)]["logits"]
    for case in CASES[1:]:
        assert not torch.allclose(world[(*case, "dot_product", False)]["logits"], ref, atol=1e-3), case


# ------------------------------------------------------------------- the run's decision (point 5)
def _flags(*extra):
    from megatron_solo.training.arguments import build_parser

    return build_parser().parse_args(["--seq-length", "128", "--train-iters", "2", "--data-path", "x", *extra])


def _plan(choices: dict | None, finetune=False):
    from megatron_solo.model import SoloModelArgs
    from megatron_solo.training.config import ResumePlan

    if choices is None:
        return ResumePlan(None, False, None)
    args = SoloModelArgs.from_preset("tiny").to_dict()
    args.update(choices)
    return ResumePlan("/ckpt", finetune, {"model_args": args, "iteration": 5})


def test_the_run_decides_the_choices_once_and_says_a_change():
    from megatron_solo.model import SoloModelArgs
    from megatron_solo.training.arguments import ArgumentError
    from megatron_solo.training.config import decide_image_choices

    tiny = SoloModelArgs.from_preset("tiny")
    decide = lambda flags, plan, te=False: decide_image_choices(flags, tiny, plan, te)  # noqa: E731
    # defaults: SOLO's; a flag alone: the flag
    m, note = decide(_flags(), _plan(None))
    assert (m.image_attention, m.image_positions, note) == ("causal", "1d", None)
    m, _ = decide(_flags("--image-attention", "bidirectional", "--image-positions", "mrope"), _plan(None))
    assert (m.image_attention, m.image_positions) == ("bidirectional", "mrope")
    # a resume without the flags keeps the checkpoint's record; one saved before the choices existed is SOLO's
    m, note = decide(_flags(), _plan({"image_attention": "bidirectional", "image_positions": "mrope"}))
    assert (m.image_attention, m.image_positions, note) == ("bidirectional", "mrope", None)
    old = _plan({})
    old.info["model_args"].pop("image_attention")
    assert decide(_flags(), old)[0].image_attention == "causal"
    # a resume that would change it: refused, one line naming the way out
    with pytest.raises(ArgumentError) as e:
        decide(_flags("--image-attention", "bidirectional"), _plan({"image_attention": "causal"}))
    assert "\n" not in str(e.value) and "--finetune" in str(e.value) and "drop --image-attention" in str(e.value)
    # --finetune may change it, and says so
    m, note = decide(_flags("--image-positions", "mrope"), _plan({"image_positions": "1d"}, finetune=True))
    assert m.image_positions == "mrope" and note == "--finetune from /ckpt changes the checkpoint's image positions 1d -> mrope"
    # Transformer Engine on THD batches: refused at start-up, naming the flag that works; SOLO's choices pass
    with pytest.raises(ArgumentError, match="add --transformer-impl local"):
        decide(_flags("--image-attention", "bidirectional"), _plan(None), te=True)
    assert decide(_flags(), _plan(None), te=True)[0].image_attention == "causal"
    # llama3 RoPE scaling has no multimodal form in megatron-core
    with pytest.raises(ArgumentError, match="--image-positions 1d"):
        decide_image_choices(_flags("--image-positions", "mrope"), SoloModelArgs.from_preset("llama3.1-8b"),
                             _plan(None), False)


def test_the_choices_are_recorded_with_the_model_args():
    from megatron_solo.model import SoloModelArgs

    a = SoloModelArgs.from_preset("tiny", image_attention="bidirectional", image_positions="mrope")
    assert SoloModelArgs(**a.to_dict()) == a
    assert a.mrope_section == [4, 6, 6] and sum(a.mrope_section) == a.kv_channels // 2
    with pytest.raises(ValueError, match="image_attention"):
        SoloModelArgs.from_preset("tiny", image_attention="full")


def test_dry_run_plans_the_local_attention_and_its_mask_under_an_image_choice():
    """TE's THD batches cannot run an image choice, so the plan is the local spec's, mask included."""
    from megatron_solo.training.dry_run import plan
    from tests.test_dry_run import _config

    base = ["--seq-length", "2048"]
    solo = plan(_config(base))
    bidi = plan(_config(base + ["--image-attention", "bidirectional"]))
    flex = plan(_config(base + ["--image-attention", "bidirectional", "--attention-backend", "sdpa_flex"]))
    assert solo["attention"].startswith("fused") and solo["mask_bytes_per_microbatch"] == 0
    assert bidi["attention"].startswith("dot-product") and bidi["mask_bytes_per_microbatch"] == 2048 ** 2
    assert flex["attention"].startswith("FlexAttention") and 0 < flex["mask_bytes_per_microbatch"] < 2048 ** 2 / 100
    act = lambda p: p["stages"][0]["memory_bytes"]["activations"]  # noqa: E731
    assert act(bidi) > act(flex) > act(solo)  # the s x s scores and the dense mask; the block mask


# --------------------------------------------------------------------- the export (point 4)
GEN_STEPS = 4


def _prompt():
    """Two rows: text, a 2x3 image, text, a 1x2 image, text, laid out without row separators (SAIL's
    layout, the third switch); the patches and their (row, col)."""
    from megatron_solo.spec import normalize_patches

    rows, patches, coords = [], [], []
    for seed in (11, 12):
        toks, _, p, c = _doc([("text", 3), ("image_off", 2, 3), ("text", 4), ("image_off", 1, 2), ("text", 2)], seed)
        rows.append(toks)
        patches.append(p)
        coords += c
    assert IDS.vision_row_sep not in rows[0]
    return (torch.tensor(rows), normalize_patches(torch.from_numpy(np.concatenate(patches))),
            torch.tensor(coords, dtype=torch.long))


def _export(paths):
    """A model with every choice (bidirectional, mrope, trained on data without row separators), saved,
    exported (with --verify's logits check); its logits and greedy generation on a two-image prompt."""
    import dataclasses

    from megatron_solo.checkpoint import save_checkpoint
    from megatron_solo.convert.megatron_io import megatron_logits, megatron_to_hf
    from megatron_solo.model import build_solo_model, build_transformer_config
    from megatron_solo.parallel import set_seed
    from tests.test_model_parallel import model_args

    a = dataclasses.replace(model_args(), image_attention="bidirectional", image_positions="mrope")
    set_seed(7)
    torch.manual_seed(7)
    model = build_solo_model(a, build_transformer_config(a))
    save_checkpoint(paths["ckpt"], 1, [model], model_args=a, padded_vocab_size=a.padded_vocab_size(1),
                    tokenizer_model=paths["tokenizer"], args={"row_separator": False})
    out = {"export": megatron_to_hf(paths["ckpt"], paths["hf"], verify=True, verify_logits=True)}
    ids, patches, coords = _prompt()
    out["ids"], out["patches"], out["coords"] = ids, patches, coords
    out["logits"] = megatron_logits(model, ids, patches, model_args=a, patch_coords=coords)[..., :a.vocab_size]
    gen, n_patches = ids[:1], 8  # the first row's 2x3 + 1x2 patches
    for _ in range(GEN_STEPS):
        nxt = megatron_logits(model, gen, patches[:n_patches], model_args=a,
                              patch_coords=coords[:n_patches])[:, -1, :a.vocab_size].argmax(-1, keepdim=True)
        gen = torch.cat([gen, nxt], dim=1)
    out["generation"] = gen
    return out


@pytest.mark.usefixtures("plain_torch")
def test_export_with_every_choice_matches_megatron_and_generates_alike_with_and_without_cache(world):
    import json
    import os

    from transformers import AutoModelForCausalLM

    from megatron_solo.model.image_blocks import ImageTokens

    paths, out = world[0], world[1]["export"]
    cfg = json.load(open(os.path.join(paths["hf"], "config.json")))
    assert (cfg["image_attention"], cfg["image_positions"], cfg["mrope_section"], cfg["vision_row_separator"]) == \
        ("bidirectional", "mrope", [4, 6, 6], False)
    assert out["export"]["verify"]["max_abs_logit_diff"] <= out["export"]["verify"]["tolerance"]
    hf = AutoModelForCausalLM.from_pretrained(paths["hf"], trust_remote_code=True, dtype=torch.float32).eval()
    ids, patches, coords = out["ids"], out["patches"], out["coords"]
    with torch.no_grad():
        logits = hf(input_ids=ids, vision_patches=patches, vision_patch_coords=coords).logits
    torch.testing.assert_close(logits, out["logits"], rtol=1e-5, atol=1e-5)
    kw = dict(input_ids=ids[:1], vision_patches=patches[:8], vision_patch_coords=coords[:8],
              max_new_tokens=GEN_STEPS, do_sample=False)
    cached = hf.generate(**kw)
    recomputed = hf.generate(**kw, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, out["generation"])
    # The HF file's own copies of the rules give the library's positions and blocks.
    from megatron_solo.model.batch import document_ids
    from megatron_solo.model.image_blocks import image_block_ids, mrope_position_ids

    modeling = type(hf).__module__
    import sys

    mod = sys.modules[modeling]
    batch = choices_batch()
    doc = document_ids(batch["doc_lengths"], SEQ)
    tok = ImageTokens.from_patch_id(IDS.vision_patch)
    assert torch.equal(mod.mrope_position_ids(batch["tokens"], batch["patch_coords"], doc, hf.config),
                       mrope_position_ids(batch["tokens"], batch["patch_coords"], doc, tok))
    assert torch.equal(mod.image_block_ids(batch["tokens"], doc, hf.config), image_block_ids(batch["tokens"], doc, tok))


def test_a_default_choice_export_config_is_as_before():
    """SOLO's choices add nothing to config.json (the export's bytes stay those of the previous release)."""
    from megatron_solo.convert.hf_config import hf_config_from_model_args, model_args_from_hf_config
    from megatron_solo.model import SoloModelArgs

    default = hf_config_from_model_args(SoloModelArgs.from_preset("tiny").to_dict())
    assert not {"image_attention", "image_positions", "mrope_section", "vision_frame_sep_token_id"} & set(default)
    chosen = hf_config_from_model_args(SoloModelArgs.from_preset("tiny", image_positions="mrope").to_dict())
    assert {k: chosen[k] for k in set(chosen) - set(default)} == {
        "image_attention": "causal", "image_positions": "mrope", "mrope_section": [4, 6, 6],
        "vision_frame_sep_token_id": IDS.vision_frame_sep}
    assert model_args_from_hf_config(chosen)["image_positions"] == "mrope"
    assert model_args_from_hf_config(default)["image_positions"] == "1d"
