"""Conversion, Hugging Face side (no megatron world): the mapping table, the exported modeling and
processing code, the streaming writer, and refusal of bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from megatron_solo.convert.errors import ConversionError
from megatron_solo.convert.hf_config import check_hf_checkpoint
from megatron_solo.convert.hf_export_files import resolve_tokenizer
from megatron_solo.convert.mapping import (
    GATED_MLP,
    QKV_GQA,
    VOCAB_PAD,
    ConversionShapes,
    bound_mappings,
    expected_hf_shapes,
)
from megatron_solo.convert.safetensors_io import StreamingSafetensorsWriter
from tests.helpers_convert import make_random_mistral, make_random_solo, mistral_config

pytestmark = pytest.mark.usefixtures("plain_torch")  # transformers' models run on plain torch
SHAPES = ConversionShapes(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=6,
                          num_query_groups=2, head_dim=16, vocab_size=33031, padded_vocab_size=33280)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"mistral": make_random_mistral(str(root / "mistral")), "solo": make_random_solo(str(root / "solo")),
            "root": root}


def test_qkv_interleave_matches_megatron_grouping_and_inverts():
    s = SHAPES
    h, d, g, hpg = s.hidden_size, s.head_dim, s.num_query_groups, s.heads_per_group
    q = torch.randn(s.num_attention_heads * d, h)
    k, v = torch.randn(g * d, h), torch.randn(g * d, h)
    fused = QKV_GQA.to_megatron((q, k, v), s)
    # megatron-core's layout: per group, its query heads, then its key head, then its value head.
    for grp in range(g):
        block = fused[grp * (hpg + 2) * d:(grp + 1) * (hpg + 2) * d]
        torch.testing.assert_close(block[:hpg * d], q[grp * hpg * d:(grp + 1) * hpg * d], rtol=0, atol=0)
        torch.testing.assert_close(block[hpg * d:(hpg + 1) * d], k[grp * d:(grp + 1) * d], rtol=0, atol=0)
        torch.testing.assert_close(block[(hpg + 1) * d:], v[grp * d:(grp + 1) * d], rtol=0, atol=0)
    for a, b in zip(QKV_GQA.to_hf(fused, s), (q, k, v)):
        assert torch.equal(a, b)


def test_gated_mlp_and_vocab_padding_invert():
    gate, up = torch.randn(96, 64), torch.randn(96, 64)
    fc1 = GATED_MLP.to_megatron((gate, up), SHAPES)
    assert torch.equal(fc1[:96], gate)  # SiLU acts on the first half in megatron-core
    assert all(torch.equal(a, b) for a, b in zip(GATED_MLP.to_hf(fc1, SHAPES), (gate, up)))
    emb = torch.randn(32000, 64)
    padded = VOCAB_PAD.to_megatron((emb,), SHAPES)
    assert padded.shape == (33280, 64) and torch.equal(padded[:32000], emb)
    torch.testing.assert_close(padded[32000:], emb.double().mean(0).float().expand(1280, 64))
    (back,) = VOCAB_PAD.to_hf(padded, SHAPES)
    assert back.shape == (33031, 64)


def test_vocab_rows_read_in_place_equal_the_import_in_memory(tmp_path):
    """The streaming import reads a vocabulary matrix's rows straight into the padded result (one copy of a
    1.2 GB Qwen3-8B embedding, not two), and gate and up into linear_fc1's halves: bit for bit what the
    transforms' to_megatron give, for a source padded past its tokenizer (Qwen) and one that is not; row
    blocks and row ranges read from the file; the patch embedding's std from row blocks (one float64 pass)
    equals torch.std's."""
    import math

    from megatron_solo.convert.mapping import patch_embed_init_std
    from megatron_solo.convert.safetensors_io import HFCheckpoint

    emb = (torch.randn(5000, 64) * 0.02 + 0.001).to(torch.bfloat16)
    w = StreamingSafetensorsWriter(str(tmp_path), [("model.embed_tokens.weight", (5000, 64), torch.bfloat16)], 2**30)
    w.write("model.embed_tokens.weight", emb)
    w.close()
    ck = HFCheckpoint(str(tmp_path))
    for vocab in (4700, 5000):  # 4700: the source's rows past its tokenizer are dropped, as a Qwen base's
        s = ConversionShapes(1, 64, 96, 6, 2, 16, vocab_size=vocab, padded_vocab_size=9216, hf_vocab_rows=5000)
        got = bound_mappings(s)[0].read_to_megatron(ck, s)
        assert got.dtype == torch.bfloat16 and torch.equal(got, VOCAB_PAD.to_megatron((emb,), s)), vocab
    assert torch.equal(torch.cat(list(ck.row_blocks("model.embed_tokens.weight", block=999))), emb)
    gate, up = emb[:96], emb[100:196]  # linear_fc1: gate and up read into their halves
    got = GATED_MLP.read_to_megatron(lambda i, out: out.copy_((gate, up)[i][: len(out)]), ((96, 64), (96, 64)),
                                     torch.bfloat16, SHAPES)
    assert torch.equal(got, GATED_MLP.to_megatron((gate, up), SHAPES))
    assert torch.equal(ck.read_rows("model.embed_tokens.weight", torch.empty(7, 64, dtype=torch.bfloat16), 4993),
                       emb[4993:])
    with pytest.raises(ValueError):
        ck.read_rows("model.embed_tokens.weight", torch.empty(8, 64, dtype=torch.bfloat16), 4993)
    std = patch_embed_init_std(ck.row_blocks("model.embed_tokens.weight", block=999))
    assert math.isclose(std, emb.double().std().item() / math.sqrt(3072), rel_tol=1e-12)
    assert math.isclose(patch_embed_init_std(emb), std, rel_tol=1e-15)


def test_table_names_are_transformers_names():
    """The table's HF side is exactly the state dict of transformers' Mistral (+ the SOLO patch embedding)."""
    from transformers import MistralForCausalLM

    from megatron_solo.convert.hf_files.modeling_solo import SoloForCausalLM

    mistral = MistralForCausalLM(mistral_config())
    want = {k: tuple(v.shape) for k, v in mistral.state_dict().items()}
    s = ConversionShapes(2, 64, 96, 6, 2, 16, 32000, 32000)
    assert expected_hf_shapes(s, include_solo_only=False) == want
    from megatron_solo.convert.hf_files.configuration_solo import SoloConfig

    solo = SoloForCausalLM(SoloConfig(**mistral_config().to_dict() | {"vocab_size": 33031}))
    got = expected_hf_shapes(ConversionShapes(2, 64, 96, 6, 2, 16, 33031, 33280))
    assert got == {k: tuple(v.shape) for k, v in solo.state_dict().items()}
    assert len(bound_mappings(2)) == 2 + 6 * 2 + 2


def test_solo_modeling_text_equals_mistral_and_adds_patches(dirs):
    from transformers import AutoModelForCausalLM

    solo = AutoModelForCausalLM.from_pretrained(dirs["solo"], trust_remote_code=True, dtype=torch.float32)
    from transformers import MistralForCausalLM

    cfg = mistral_config(vocab_size=33031)
    mistral = MistralForCausalLM(cfg).eval()
    sd = {k: v for k, v in solo.state_dict().items() if k != "model.embed_vision_patch.weight"}
    mistral.load_state_dict(sd)
    ids = torch.randint(3, 32000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(solo(input_ids=ids).logits, mistral(input_ids=ids).logits, rtol=0, atol=0)
        # An image: the projected patch is added to the <vpatch> row's embedding at each patch position.
        ids = torch.tensor([[1, 32000, 32001, 32001, 32002, 32001, 32001, 32004, 50, 60]])
        patches = torch.randn(4, 3072)
        emb = mistral.model.embed_tokens(ids)
        proj = patches @ solo.model.embed_vision_patch.weight.T
        emb[0, [2, 3, 5, 6]] += proj
        ref = mistral(inputs_embeds=emb).logits
        torch.testing.assert_close(solo(input_ids=ids, vision_patches=patches).logits, ref, rtol=1e-5, atol=1e-5)
        idx = torch.tensor([[-1, -1, 0, 1, -1, 2, 3, -1, -1, -1]])
        torch.testing.assert_close(solo(input_ids=ids, vision_patches=patches, vision_patch_indices=idx).logits,
                                   ref, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="only 3 patches"):
            solo(input_ids=ids, vision_patches=patches[:3])


def test_kv_cache_generation_equals_full_recompute(dirs):
    from PIL import Image
    from transformers import AutoModelForCausalLM

    solo = AutoModelForCausalLM.from_pretrained(dirs["solo"], trust_remote_code=True, dtype=torch.float32)
    from megatron_solo.convert.hf_files.processing_solo import SoloProcessor

    proc = SoloProcessor.from_pretrained(dirs["solo"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    inputs = proc([img, "What is it?"])
    assert inputs["vision_patches"].shape == (2 * 3, 3072)
    cached = solo.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
    # Reference: greedy decoding by full forward passes, no cache.
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            logits = solo(input_ids=ids, vision_patches=inputs["vision_patches"]).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)
    nocache = solo.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(nocache, ids)


def test_processor_follows_the_spec_and_the_training_data_path(dirs):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from megatron_solo.convert.hf_files import processing_solo as P
    from megatron_solo import spec
    from megatron_solo.data import image as D

    for (w, h), want in {(500, 375): (512, 384), (2048, 1536): (1024, 768), (40, 10): (64, 32),
                         (3000, 1): (1024, 32), (375, 500): (384, 512)}.items():
        assert P.target_size(w, h) == want
        assert D.target_size(w, h) == want
    photo = Image.fromarray(load_sample_images().images[0])  # 640x427
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 33, 4), dtype=np.uint8), "RGBA")
    for img in (photo, rgba, photo.convert("L")):
        p, r, c = P.image_to_patches(img)
        q, r2, c2 = D.image_to_patches(img)
        assert (r, c) == (r2, c2) and np.array_equal(p, q)
        assert torch.equal(P.normalize_patches(p), spec.normalize_patches(q))
    proc = P.SoloProcessor.from_pretrained(dirs["solo"])
    out = proc([photo, "a photo"])
    r, c = 14, 20  # 640x427 -> 640x448
    ids = out["input_ids"][0].tolist()
    assert ids[0] == 1 and ids[1] == 32000 and ids[1 + r * c + (r - 1) + 1] == 32004
    assert ids.count(32001) == r * c and ids.count(32002) == r - 1
    assert out["vision_patch_indices"][0][ids.index(32001)].item() == 0


def test_streaming_writer_shards_and_index(tmp_path):
    from safetensors.torch import load_file

    tensors = {f"t{i}": torch.randn(100 + i, 7).to(torch.bfloat16) for i in range(5)}
    w = StreamingSafetensorsWriter(str(tmp_path), [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
                                   max_shard_bytes=3000)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) == w.num_shards > 1
    loaded = {}
    for f in set(index["weight_map"].values()):
        loaded.update(load_file(str(tmp_path / f)))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_bad_input_is_refused_clearly(dirs):
    root = dirs["root"]

    def copy(name):
        d = str(root / name)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(dirs["solo"], d)
        return d

    assert check_hf_checkpoint(dirs["solo"])[0] == "solo"
    assert check_hf_checkpoint(dirs["mistral"])[0] == "mistral"
    shards = sorted(f for f in os.listdir(dirs["solo"]) if f.endswith(".safetensors"))
    d = copy("missing")
    os.remove(os.path.join(d, shards[1]))
    with pytest.raises(ConversionError, match=f"{shards[1]}: shard listed in the index is missing"):
        check_hf_checkpoint(d)
    d = copy("truncated")
    path = os.path.join(d, shards[0])
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 100])
    with pytest.raises(ConversionError, match="truncated"):
        check_hf_checkpoint(d)
    d = copy("garbage")
    open(os.path.join(d, shards[0]), "wb").write(b"\x00garbage" * 10)
    with pytest.raises(ConversionError, match="corrupt safetensors"):
        check_hf_checkpoint(d)
    d = copy("shape")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ConversionError, match=r"mlp.gate_proj.weight has shape \[96, 64\], config.json implies "
                                              r"\[128, 64\]"):
        check_hf_checkpoint(d)
    d = copy("noconfig")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(ConversionError, match="no config.json"):
        check_hf_checkpoint(d)
    # Tokenizers: a SOLO checkpoint needs SOLO's; a Mistral one needs a 32000-piece base; junk is refused.
    mistral_tok = os.path.join(dirs["mistral"], "tokenizer.model")
    with pytest.raises(ConversionError, match="32000 pieces; a SOLO checkpoint needs SOLO's 33031-piece"):
        resolve_tokenizer("solo", dirs["solo"], mistral_tok, str(root / "t1"))
    with pytest.raises(ConversionError, match="needs --tokenizer-model"):
        resolve_tokenizer("mistral", str(root), None, str(root / "t2"))
    junk = str(root / "junk.model")
    open(junk, "wb").write(b"not a sentencepiece model")
    with pytest.raises(ConversionError, match="not a SentencePiece model"):
        resolve_tokenizer("mistral", dirs["mistral"], junk, str(root / "t3"))
    solo_tok = resolve_tokenizer("mistral", dirs["mistral"], mistral_tok, str(root / "t4"))
    assert resolve_tokenizer("solo", dirs["solo"], solo_tok, str(root / "t5")) == solo_tok


def test_processor_token_ids_match_the_training_encoder(dirs, tmp_path):
    from PIL import Image

    from megatron_solo.convert.hf_files.processing_solo import SoloProcessor
    from megatron_solo.data.encode import DocumentEncoder, Message
    from megatron_solo.data.tokenizer import SoloTokenizer

    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (70, 45, 3), dtype=np.uint8))
    path = str(tmp_path / "img.png")
    img.save(path)
    proc = SoloProcessor.from_pretrained(dirs["solo"])
    tok = SoloTokenizer(os.path.join(dirs["solo"], "tokenizer.model"))
    parts = ["Look:\n", img, "\nWhat is it? A cat."]
    msgs = [Message("user", [("text", "Look:\n"), ("image", path), ("text", "\nWhat is it?")]),
            Message("assistant", [("text", "A cat.")])]
    got = proc.chat([{"role": "user", "content": parts[:2] + ["\nWhat is it?"]},
                     {"role": "assistant", "content": "A cat."}], add_generation_prompt=False)
    want = DocumentEncoder(tok, fmt="chat").encode(msgs)
    assert got["input_ids"][0].tolist() == want.tokens.tolist()
    assert torch.equal(got["vision_patches"], proc_norm(want.patches))
    got = proc(parts)
    want = DocumentEncoder(tok, fmt="pretrain").encode([Message("assistant", [("text", "Look:\n"), ("image", path),
                                                                              ("text", "\nWhat is it? A cat.")])])
    assert got["input_ids"][0].tolist() == want.tokens.tolist()


def proc_norm(p):
    from megatron_solo.convert.hf_files.processing_solo import normalize_patches

    return normalize_patches(p)
