"""SoloModel on megatron-core, checked across parallel layouts on CPU/gloo (tiny preset, real photos).

Two worlds are started per session: one of 1 rank (single-process checks and the DP=1 reference) and
one of 2 ranks (TP=2, SP, PP=2 and DP=2 in turn). Each runs its checks once and returns the numbers;
the tests below compare them. Every comparison is against an independent computation: another
parallel layout of the same weights, the same documents run separately, or the patch embedding
recomputed from the image's pixels with numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_solo.data.roles import label_loss_mask
from megatron_solo.spec import ASSISTANT, IMAGE, SOLO_IDS, USER
from megatron_solo.testing.distributed import run_distributed

SEQ, MBS = 64, 2
WINDOW = 12  # a sliding window shorter than the documents, so that it is exercised
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------------------------
# Real image patches and SOLO-layout documents, built here from scratch
# ----------------------------------------------------------------------------------------------

def image_patches(index: int, width: int, height: int) -> tuple[np.ndarray, int, int]:
    """A scikit-learn sample photo, resized (PIL bilinear) and cut into 32x32 channel-major uint8 patches."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    img = Image.fromarray(load_sample_images().images[index]).resize((width, height), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    rows, cols = height // 32, width // 32
    patches = a.reshape(rows, 32, cols, 32, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3 * 32 * 32)
    return np.ascontiguousarray(patches), rows, cols


def image_tokens(rows: int, cols: int) -> list[int]:
    ids = [SOLO_IDS.vision_start]
    for r in range(rows):
        ids += [SOLO_IDS.vision_patch] * cols
        if r < rows - 1:
            ids.append(SOLO_IDS.vision_row_sep)
    return ids + [SOLO_IDS.vision_end]


def make_doc(kind: str, seed: int):
    """(tokens, roles, patches) of one document: 'image' (pre-training, image then caption),
    'text' (a chat without images), 'chat_image' (a user turn with an image, then the answer)."""
    g = np.random.default_rng(seed)
    words = lambda n: [int(x) for x in g.integers(3, 32000, n)]  # noqa: E731
    toks, roles, patches = [SOLO_IDS.bos], [ASSISTANT], np.zeros((0, 3072), np.uint8)
    if kind == "image":
        p, r, c = image_patches(seed % 2, 96, 64)  # 3 x 2 patches
        img = image_tokens(r, c)
        toks += img + words(10)
        roles += [IMAGE] * len(img) + [ASSISTANT] * 10
        patches = p
    elif kind == "text":
        roles = [USER]
        for role, n in ((USER, 6), (ASSISTANT, 8)):
            toks += [SOLO_IDS.im_start] + words(n) + [SOLO_IDS.im_end]
            roles += [role] * (n + 2)
    elif kind == "chat_image":
        roles = [USER]
        p, r, c = image_patches(seed % 2, 64, 64)  # 2 x 2 patches
        img = image_tokens(r, c)
        toks += [SOLO_IDS.im_start] + img + words(4) + [SOLO_IDS.im_end]
        roles += [USER] + [IMAGE] * len(img) + [USER] * 5
        toks += [SOLO_IDS.im_start] + words(7) + [SOLO_IDS.im_end]
        roles += [ASSISTANT] * 9
        patches = p
    else:
        raise ValueError(kind)
    return toks, roles, patches


def pack(rows: list[list[tuple]], seq: int = SEQ, loss_role: str = "assistant") -> dict:
    """The micro-batch contract of docs/ARCHITECTURE.md, from documents packed into rows."""
    b = len(rows)
    tokens = np.zeros((b, seq), np.int64)
    roles = np.zeros((b, seq), np.int64)
    valid = np.zeros((b, seq), bool)  # label valid: next token in the same document
    pos = np.zeros((b, seq), np.int64)
    image_doc = np.zeros((b, seq), bool)
    lengths = np.zeros((b, 4), np.int32)
    patches = []
    for i, docs in enumerate(rows):
        off = 0
        for j, (t, r, p) in enumerate(docs):
            n = len(t)
            tokens[i, off:off + n], roles[i, off:off + n] = t, r
            valid[i, off:off + n - 1] = True
            pos[i, off:off + n] = np.arange(n)
            image_doc[i, off:off + n] = len(p) > 0
            lengths[i, j] = n
            patches.append(p)
            off += n
        assert off <= seq
        if off < seq:  # trailing padding is one more segment
            lengths[i, len(docs)] = seq - off
            pos[i, off:] = np.arange(seq - off)
    labels = np.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    label_roles = np.zeros_like(roles)
    label_roles[:, :-1] = roles[:, 1:]
    labels = np.where(valid, labels, 0)
    mask = label_loss_mask(labels, label_roles, valid, loss_role)
    return dict(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(pos),
        doc_lengths=torch.from_numpy(lengths),
        image_doc_mask=torch.from_numpy(image_doc),
        patches=torch.from_numpy(np.concatenate(patches)),
    )


def mixed_batch(seed: int = 0) -> dict:
    """Row 0: image document + text chat; row 1: chat with an image + image document."""
    return pack([
        [make_doc("image", seed), make_doc("text", seed + 1)],
        [make_doc("chat_image", seed + 2), make_doc("image", seed + 3)],
    ])


# ----------------------------------------------------------------------------------------------
# Model helpers (run inside the spawned ranks)
# ----------------------------------------------------------------------------------------------

def model_args(**overrides):
    from megatron_solo.model import SoloModelArgs

    return SoloModelArgs.from_preset("tiny", sliding_window=WINDOW, init_method_std=0.05, **overrides)


def build(seed: int = 1234, **cfg):
    from megatron_solo.model import build_solo_model, build_transformer_config
    from megatron_solo.parallel import set_seed

    from megatron.core import parallel_state

    args = model_args()
    config = build_transformer_config(
        args,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        **cfg,
    )
    set_seed(seed)
    torch.manual_seed(seed)  # CPU init draws every full weight from this generator, then slices it
    # One padded vocabulary for every layout (Megatron's rule at the largest TP used here, 2), so that
    # TP=1 and TP=2 draw the same full embedding and output weights.
    return build_solo_model(args, config, padded_vocab_size=args.padded_vocab_size(2)), config


def forward(model, config, batch):
    from megatron_solo.model import model_forward_kwargs

    return model(**model_forward_kwargs(batch, config))


def gather_logits(logits):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits).detach().clone()


def loss_and_grads(model, config, batch):
    """Per-token losses, (loss_sum/num_tokens) backward; returns losses, patch grad, a norm grad."""
    from megatron.core import parallel_state

    from megatron_solo.model import solo_loss_func

    model.zero_grad(set_to_none=True)
    losses = forward(model, config, batch)
    loss_sum, n, report = solo_loss_func(batch, losses)
    (loss_sum / n).backward()
    norm_grad = model.decoder.layers[0].input_layernorm.weight.grad.detach().clone()
    if getattr(model.decoder.layers[0].input_layernorm.weight, "sequence_parallel", False):
        # What finalize_model_grads does for SP-marked params: sum the partial grads over TP.
        torch.distributed.all_reduce(norm_grad, group=parallel_state.get_tensor_model_parallel_group())
    return dict(
        losses=losses.detach().clone(),
        report={k: v.clone() for k, v in report.items()},
        patch_grad=model.vision_patch_embed.weight.grad.detach().clone(),
        norm_grad=norm_grad,
    )


def run_schedule(model, config, batches, forward_only=False, model_args=None):
    """megatron-core's schedule (1F1B when PP > 1); returns the per-micro-batch [sum, count] reports.
    ``model_args``: the model's image choices (None: SOLO's)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_solo.model import model_forward_kwargs, solo_loss_func

    it = iter(batches)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(**model_forward_kwargs(batch, config, model_args=model_args))
        return out, lambda output: solo_loss_func(batch, output)

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=it, model=model, num_microbatches=len(batches),
        seq_length=SEQ, micro_batch_size=MBS, forward_only=forward_only,
    )
    return [r["lm loss"].clone() for r in reports] if parallel_state.is_pipeline_last_stage() else None


def dp_training(n_steps: int = 2):
    """Two steps of DDP + Adam (distributed optimizer when DP > 1); global batch of 4 micro-batches."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_solo.parallel import initialize_model_parallel

    initialize_model_parallel()
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    model, config = build()
    init_patch_weight = model.vision_patch_embed.weight.detach().clone()
    config.finalize_model_grads_func = finalize_model_grads
    use_dist_opt = dp > 1
    model = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_dist_opt),
        module=model,
    )
    opt = get_megatron_optimizer(
        config=OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, clip_grad=1.0,
                               use_distributed_optimizer=use_dist_opt),
        model_chunks=[model],
    )
    global_micro, per_rank = 4, 4 // dp
    grad_norms = []
    for step in range(n_steps):
        ids = [step * global_micro + dp_rank * per_rank + j for j in range(per_rank)]
        model.zero_grad_buffer()
        opt.zero_grad()
        run_schedule([model], config, [mixed_batch(10 * i) for i in ids])
        ok, grad_norm, _ = opt.step()
        assert ok
        grad_norms.append(float(grad_norm))
    return {"grad_norms": grad_norms, "init_patch_weight": init_patch_weight,
            "params": {n: p.detach().clone() for n, p in model.module.named_parameters()}}


def compare_with_hf_mistral(model, batch):
    """Copy the weights into transformers' Mistral (an implementation nobody here wrote) and run both."""
    from transformers import MistralConfig, MistralForCausalLM

    from megatron_solo import cpu_backend

    a = model_args()
    with cpu_backend.suspended():  # transformers' model is built and run on plain torch
        hf = MistralForCausalLM(MistralConfig(
            vocab_size=model.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.ffn_hidden_size,
            num_hidden_layers=a.num_layers, num_attention_heads=a.num_attention_heads,
            num_key_value_heads=a.num_query_groups, head_dim=a.kv_channels,
            max_position_embeddings=a.max_position_embeddings,
            rms_norm_eps=a.norm_epsilon, rope_theta=float(a.rotary_base), sliding_window=a.sliding_window,
            tie_word_embeddings=False, attn_implementation="eager",
        )).eval()
    nq, ng, d = a.num_attention_heads, a.num_query_groups, a.kv_channels
    sd = {"model.embed_tokens.weight": model.embedding.word_embeddings.weight,
          "model.norm.weight": model.decoder.final_layernorm.weight, "lm_head.weight": model.output_layer.weight}
    for i, layer in enumerate(model.decoder.layers):
        qkv = layer.self_attention.linear_qkv.weight.view(ng, nq // ng + 2, d, a.hidden_size)
        fc1 = layer.mlp.linear_fc1.weight
        p = f"model.layers.{i}."
        sd.update({
            p + "self_attn.q_proj.weight": qkv[:, :nq // ng].reshape(nq * d, -1),
            p + "self_attn.k_proj.weight": qkv[:, -2].reshape(ng * d, -1),
            p + "self_attn.v_proj.weight": qkv[:, -1].reshape(ng * d, -1),
            p + "self_attn.o_proj.weight": layer.self_attention.linear_proj.weight,
            p + "mlp.gate_proj.weight": fc1[:a.ffn_hidden_size], p + "mlp.up_proj.weight": fc1[a.ffn_hidden_size:],
            p + "mlp.down_proj.weight": layer.mlp.linear_fc2.weight,
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.pre_mlp_layernorm.weight,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    config = model.config
    res = {}
    with torch.no_grad():
        for name, row in (("image_doc", 0), ("text_doc", None)):
            if row == 0:
                n = int(batch["doc_lengths"][0, 0])
                one = {k: batch[k][:1, :n] for k in ("tokens", "position_ids")}
                one["doc_lengths"], one["patches"] = torch.tensor([[n]]), batch["patches"][:6]
            else:
                t, r, p_ = make_doc("text", 5)
                one = dict(tokens=torch.tensor([t]), position_ids=torch.arange(len(t))[None],
                           doc_lengths=torch.tensor([[len(t)]]), patches=torch.zeros(0, 3072, dtype=torch.uint8))
            ours = forward(model, config, one)
            emb = model.embed_inputs(one["tokens"], one["position_ids"], one["patches"]).transpose(0, 1)
            with cpu_backend.suspended():
                theirs = hf(inputs_embeds=emb, position_ids=one["position_ids"]).logits
            res[name] = (ours.clone(), theirs.clone())
    return res


# ----------------------------------------------------------------------------------------------
# World of one rank
# ----------------------------------------------------------------------------------------------

def _single_rank_worker():
    from megatron_solo.model import solo_loss_func
    from megatron_solo.parallel import initialize_model_parallel

    out = {}
    initialize_model_parallel()
    model, config = build()
    batch = mixed_batch()

    # The decoder input, and the pieces an independent computation needs.
    with torch.no_grad():
        out["decoder_input"] = model.embed_inputs(batch["tokens"], batch["position_ids"], batch["patches"]).clone()
    out["word_embeddings"] = model.embedding.word_embeddings.weight.detach().clone()
    out["patch_weight"] = model.vision_patch_embed.weight.detach().clone()
    out["batch"] = batch

    # Packed documents vs the same documents run one by one (row 0: image + text, row 1: two images).
    with torch.no_grad():
        out["packed_losses"] = forward(model, config, batch).clone()
        singles = []
        for row in (0, 1):
            lengths = [int(n) for n in batch["doc_lengths"][row] if n > 0]
            off, k0 = 0, int((batch["tokens"][:row] == SOLO_IDS.vision_patch).sum())
            for n in lengths:
                sl = slice(off, off + n)
                n_patch = int((batch["tokens"][row, sl] == SOLO_IDS.vision_patch).sum())
                one = dict(
                    tokens=batch["tokens"][row:row + 1, sl], labels=batch["labels"][row:row + 1, sl],
                    position_ids=batch["position_ids"][row:row + 1, sl],
                    doc_lengths=torch.tensor([[n]]), patches=batch["patches"][k0:k0 + n_patch],
                )
                singles.append((row, off, n, forward(model, config, one)[0].clone()))
                off, k0 = off + n, k0 + n_patch
        out["single_losses"] = singles

        # Without the explicit mask the documents of a pack do see each other: the check can fail.
        kw_nomask = dict(batch)
        kw_nomask.pop("doc_lengths")
        out["unmasked_losses"] = forward(model, config, kw_nomask).clone()

        # Loss function on real model output: masked tokens never count.
        losses = out["packed_losses"]
        out["loss_func"] = solo_loss_func(batch, losses)

    # transformers' MistralForCausalLM with the same weights, on one image document (inputs_embeds =
    # our decoder input, so the patch embedding is included) and on one text document.
    out["hf"] = compare_with_hf_mistral(model, batch)

    # Activation recompute (full uniform/block, selective) gives the same losses and gradients.
    base = loss_and_grads(model, config, batch)
    out["recompute"] = {"none": base}
    for name, kw in (("full_uniform", dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
                     ("full_block", dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2)),
                     ("selective", dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]))):
        m, c = build(**kw)
        assert c.recompute_granularity == kw["recompute_granularity"]
        out["recompute"][name] = loss_and_grads(m, c, batch)

    out["dp1"] = dp_training()
    return out


# ----------------------------------------------------------------------------------------------
# World of two ranks
# ----------------------------------------------------------------------------------------------

def _two_rank_worker(ckpt_dir):
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_solo.parallel import initialize_model_parallel

    out = {}
    batch = mixed_batch()

    # TP=2 (with and without SP) against TP=1, same seed -> same full weights.
    for name, tp, sp in (("tp2", 2, False), ("tp2_sp", 2, True), ("tp1", 1, False)):
        initialize_model_parallel(tensor_model_parallel_size=tp)
        model, config = build(sequence_parallel=sp)
        assert config.sequence_parallel == sp
        r = loss_and_grads(model, config, batch)
        with torch.no_grad():
            kwargs = dict(batch)
            kwargs.pop("labels")
            r["logits"] = gather_logits(forward(model, config, kwargs))
        out[name] = r

    # PP=2 against PP=1: the weights of one PP=1 checkpoint, loaded into a PP=2 model of another seed.
    batches = [mixed_batch(100), mixed_batch(200)]
    initialize_model_parallel(pipeline_model_parallel_size=1)
    ref, config = build()
    out["pp1"] = run_schedule([ref], config, batches, forward_only=True)
    dist_checkpointing.save(ref.sharded_state_dict(), ckpt_dir)
    torch.distributed.barrier()
    initialize_model_parallel(pipeline_model_parallel_size=2)
    model, config = build(seed=4321)
    out["pp2_other_seed"] = run_schedule([model], config, batches, forward_only=True)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    out["pp2"] = run_schedule([model], config, batches, forward_only=True)
    out["pp_stage"] = parallel_state.get_pipeline_model_parallel_rank()
    out["pp_has_patch_embed"] = model.vision_patch_embed is not None

    out["dp2"] = dp_training()
    return out


def as_bytes(fn, *args):
    """Run ``fn`` and return its result serialised: tensors sent through a multiprocessing queue
    travel as shared-memory handles that die with the rank that made them."""
    import io

    buf = io.BytesIO()
    torch.save(fn(*args), buf)
    return buf.getvalue()


def from_bytes(data: bytes):
    import io

    return torch.load(io.BytesIO(data), weights_only=False)


@pytest.fixture(scope="module")
def single():
    (r,) = run_distributed(as_bytes, 1, _single_rank_worker, timeout=600)
    return from_bytes(r)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp_ckpt")
    return [from_bytes(r) for r in run_distributed(as_bytes, 2, _two_rank_worker, str(d), timeout=900)]


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

def test_decoder_input_at_vpatch_is_embedding_plus_projected_normalised_patch(single):
    batch, emb, W = single["batch"], single["word_embeddings"].double(), single["patch_weight"].double()
    x = single["decoder_input"].transpose(0, 1).double()  # [b, s, h]
    tokens = batch["tokens"]
    expected = emb[tokens]  # word embedding everywhere
    # Independently: pixels -> [0, 1] -> ImageNet normalisation per channel (channel-major patches).
    pix = batch["patches"].numpy().reshape(-1, 3, 1024).astype(np.float64) / 255.0
    norm = ((pix - IMAGENET_MEAN[None, :, None]) / IMAGENET_STD[None, :, None]).reshape(-1, 3072)
    proj = torch.from_numpy(norm) @ W.T
    k = 0
    for bi in range(tokens.size(0)):
        for si in range(tokens.size(1)):
            if tokens[bi, si] == SOLO_IDS.vision_patch:
                expected[bi, si] += proj[k]
                k += 1
    assert k == batch["patches"].size(0) == 6 + 4 + 6  # every patch of the batch was used, in order
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    # Text positions got nothing added; every patch position got something.
    is_patch = tokens == SOLO_IDS.vision_patch
    torch.testing.assert_close(x[~is_patch], emb[tokens][~is_patch], rtol=0, atol=1e-7)
    assert (x[is_patch] - emb[tokens][is_patch]).abs().amax(dim=-1).min() > 1e-3


def test_pack_of_documents_equals_documents_run_separately(single):
    packed = single["packed_losses"]
    kinds = set()
    for row, off, n, alone in single["single_losses"]:
        got = packed[row, off:off + n]
        # The last token of a document has no valid label (it is predicted as 0 in both runs).
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
        kinds.add(bool(single["batch"]["image_doc_mask"][row, off]))
    assert kinds == {True, False}, "the packs must hold documents with and without images"
    # Without the block-diagonal mask the second document of row 0 changes: the check has teeth.
    row, off, n, _ = single["single_losses"][1]
    assert not torch.allclose(single["unmasked_losses"][row, off:off + n], packed[row, off:off + n], atol=1e-4)


def test_loss_func_sums_only_masked_tokens_and_reports_image_and_text_docs(single):
    batch, losses = single["batch"], single["packed_losses"]
    loss_sum, n, report = single["loss_func"]
    mask = batch["loss_mask"]
    assert int(n) == int(mask.sum()) > 0
    torch.testing.assert_close(loss_sum, (losses * mask).sum())
    img = batch["image_doc_mask"]
    torch.testing.assert_close(report["image-doc loss"], torch.stack([(losses * mask * img).sum(), (mask * img).sum()]))
    torch.testing.assert_close(report["text-doc loss"], torch.stack([(losses * mask * ~img).sum(), (mask * ~img).sum()]))
    torch.testing.assert_close(report["image-doc loss"] + report["text-doc loss"], report["lm loss"])
    assert report["image-doc loss"][1] > 0 and report["text-doc loss"][1] > 0


def test_backbone_equals_transformers_mistral_with_sliding_window(single):
    for name, (ours, theirs) in single["hf"].items():
        assert ours.shape[1] > WINDOW  # the window cuts into these documents
        v = SOLO_IDS.im_end + 1  # the real vocabulary; ours masks the padded rows (model.loss.mask_padded_vocab)
        torch.testing.assert_close(ours[..., :v], theirs[..., :v], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        assert float(ours[..., v:].max()) == torch.finfo(ours.dtype).min


def test_activation_recompute_gives_the_same_losses_and_grads(single):
    r = single["recompute"]
    assert set(r) == {"none", "full_uniform", "full_block", "selective"}
    for name in ("full_uniform", "full_block", "selective"):
        for key in ("losses", "patch_grad", "norm_grad"):
            torch.testing.assert_close(r[name][key], r["none"][key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name} {key}: {m}")


def test_tp2_equals_tp1_logits_loss_and_patch_grad(pair):
    for r in pair:
        torch.testing.assert_close(r["tp2"]["logits"], r["tp1"]["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["tp2"]["losses"], r["tp1"]["losses"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["tp2"]["patch_grad"], r["tp1"]["patch_grad"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(r["tp2"]["norm_grad"], r["tp1"]["norm_grad"], rtol=1e-4, atol=1e-7)
        assert r["tp1"]["patch_grad"].abs().max() > 0
    # The replicated patch embedding ends with the same gradient on both TP ranks.
    torch.testing.assert_close(pair[0]["tp2"]["patch_grad"], pair[1]["tp2"]["patch_grad"], rtol=0, atol=0)


def test_sequence_parallel_tp2_equals_tp1(pair):
    for r in pair:
        torch.testing.assert_close(r["tp2_sp"]["logits"], r["tp1"]["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["tp2_sp"]["losses"], r["tp1"]["losses"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["tp2_sp"]["patch_grad"], r["tp1"]["patch_grad"], rtol=1e-4, atol=1e-7)
        # RMSNorm weights under SP: partial grads, summed over TP (as finalize_model_grads does) = TP=1.
        torch.testing.assert_close(r["tp2_sp"]["norm_grad"], r["tp1"]["norm_grad"], rtol=1e-4, atol=1e-7)


def test_pp2_equals_pp1_from_one_checkpoint(pair):
    last = next(r for r in pair if r["pp_stage"] == 1)
    first = next(r for r in pair if r["pp_stage"] == 0)
    assert first["pp_has_patch_embed"] and not last["pp_has_patch_embed"]
    assert first["pp2"] is None and len(last["pp2"]) == 2
    for got, ref in zip(last["pp2"], last["pp1"]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # Before loading, the other seed's weights give other losses: the checkpoint carried the weights.
    assert not torch.allclose(last["pp2_other_seed"][0], last["pp1"][0], rtol=1e-3)


def test_dp2_distributed_optimizer_equals_dp1_after_two_steps(single, pair):
    dp1 = single["dp1"]
    for r in pair:
        dp2 = r["dp2"]
        assert dp2["grad_norms"] == pytest.approx(dp1["grad_norms"], rel=1e-5)
        for name, p in dp1["params"].items():
            # Adam divides by sqrt(v): a gradient summed in another order moves a near-zero-gradient
            # weight by a few 1e-6 (the steps themselves are ~1e-3).
            torch.testing.assert_close(dp2["params"][name], p, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # The steps moved the weights (patch embedding included): the comparison is not of untouched params.
    moved = (dp1["params"]["vision_patch_embed.weight"] - dp1["init_patch_weight"]).abs().max()
    assert moved > 1e-4
