"""The exported Hugging Face files keep their own copies of SOLO's facts (an export is self-contained):
each copy equals megatron_solo.spec, and every normalisation gives spec.normalize_patches' values."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_solo import spec
from megatron_solo.convert.hf_files import configuration_solo, processing_solo
from megatron_solo.convert.hf_config import hf_config_from_model_args, model_args_from_hf_config
from tests.helpers_convert import mistral_config


def test_ids_follow_the_pieces():
    ids = spec.SOLO_IDS
    assert spec.SOLO_VOCAB_SIZE == 33031 and spec.BASE_VOCAB_SIZE == 32000
    assert (ids.vision_start, ids.vision_patch, ids.vision_row_sep, ids.vision_frame_sep, ids.vision_end) == (
        32000, 32001, 32002, 32003, 32004)
    assert (ids.loc_first, ids.im_start, ids.im_end) == (32005, 33029, 33030)
    assert spec.PATCH_DIM == 3072 and spec.pad_vocab_size(spec.SOLO_VOCAB_SIZE, 2) == 33280


def test_mistral_vocab_is_solo_ids():
    """docs/DATA_FORMAT.md "Tokenizer and SOLO's vocabulary": the Mistral case of SoloVocab is exactly today's fixed ids."""
    v, ids = spec.MISTRAL_VOCAB, spec.SOLO_IDS
    assert (v.base_size, v.size) == (spec.BASE_VOCAB_SIZE, spec.SOLO_VOCAB_SIZE) == (32000, 33031)
    for f in ("vision_start", "vision_patch", "vision_row_sep", "vision_frame_sep", "vision_end", "loc_first",
              "im_start", "im_end", "bos", "eos"):
        assert getattr(v, f) == getattr(ids, f), f
    assert v.pad == 0 and v.base_special_ids == (1, 2)
    assert v.piece_ids() == {p: 32000 + k for k, p in enumerate(spec.SOLO_SPECIAL_PIECES)}
    assert v.control_ids == frozenset(range(32000, 33031)) | {1, 2}


def test_vocab_over_a_base_reuses_its_chat_markers_and_round_trips():
    v = spec.SoloVocab.over_base(151669, bos=None, eos=151643, pad=151643, base_special_ids=[151645, 151643, 151644],
                                 reused={spec.IM_START: 151644, spec.IM_END: 151645})
    assert (v.vision_start, v.loc_first, v.size) == (151669, 151674, 151669 + 1029)  # 1031 pieces, 2 reused
    assert (v.im_start, v.im_end, v.bos, v.base_special_ids) == (151644, 151645, None, (151643, 151644, 151645))
    assert spec.SoloVocab.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    with pytest.raises(ValueError, match="fields"):
        spec.SoloVocab.from_dict({**v.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="only"):
        spec.SoloVocab.over_base(10, bos=1, eos=2, pad=0, base_special_ids=(), reused={spec.VISION_START: 3})
    # the one check where two vocabularies meet: silent when equal, one line naming both otherwise
    m = spec.MISTRAL_VOCAB
    assert spec.vocab_mismatch(m, spec.SoloVocab.from_dict(m.to_dict()), "data", "model") is None
    msg = spec.vocab_mismatch(v, m, "data prefix p", "the model")
    assert msg == ("data prefix p has SOLO's vocabulary of 152698 ids (<vision>=151669 after a 151669-id base), "
                   "the model has 33031 ids (<vision>=32000 after a 32000-id base)")
    other_eos = spec.SoloVocab.from_dict({**m.to_dict(), "eos": 5})
    assert "\n" not in spec.vocab_mismatch(other_eos, m, "a", "b") and "eos" in spec.vocab_mismatch(other_eos, m, "a", "b")


def test_hf_configuration_copy_equals_spec():
    cfg = configuration_solo.SoloConfig()
    ids = spec.SOLO_IDS
    assert cfg.vocab_size == spec.SOLO_VOCAB_SIZE
    assert cfg.vision_patch_size == spec.PATCH_SIZE and cfg.vision_patch_dim == spec.PATCH_DIM
    assert (cfg.vision_start_token_id, cfg.vision_patch_token_id, cfg.vision_row_sep_token_id,
            cfg.vision_end_token_id) == (ids.vision_start, ids.vision_patch, ids.vision_row_sep, ids.vision_end)
    # the config.json an export writes says the same
    exported = hf_config_from_model_args(model_args_from_hf_config(mistral_config().to_dict()))
    for key in ("vocab_size", "vision_patch_size", "vision_start_token_id", "vision_patch_token_id",
                "vision_row_sep_token_id", "vision_end_token_id"):
        assert exported[key] == getattr(cfg, key), key
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (spec.BOS_ID, spec.EOS_ID)


def test_hf_processing_copy_equals_spec():
    P = processing_solo
    assert P.PATCH_SIZE == spec.PATCH_SIZE and P.MAX_LONG_SIDE == spec.MAX_LONG_SIDE
    assert P.IMAGE_MEAN == spec.IMAGENET_MEAN and P.IMAGE_STD == spec.IMAGENET_STD
    assert (P.UNK_ID, P.BOS_ID, P.EOS_ID, P.BASE_VOCAB_SIZE) == (spec.UNK_ID, spec.BOS_ID, spec.EOS_ID,
                                                                  spec.BASE_VOCAB_SIZE)
    assert (P.VISION_START_ID, P.IM_END_ID) == (spec.SOLO_IDS.vision_start, spec.SOLO_IDS.im_end)
    assert (P.IM_START_ID, P.LOC_FIRST_ID, P.NUM_LOC_TOKENS) == (spec.SOLO_IDS.im_start, spec.SOLO_IDS.loc_first,
                                                                 spec.NUM_LOC_TOKENS)
    assert (P.VISION_START, P.VISION_PATCH, P.VISION_ROW_SEP, P.VISION_END, P.IM_START, P.IM_END) == (
        spec.VISION_START, spec.VISION_PATCH, spec.VISION_ROW_SEP, spec.VISION_END, spec.IM_START, spec.IM_END)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, (37, spec.PATCH_DIM), dtype=np.uint8)


def test_normalisations_agree(pixels):
    want = spec.normalize_patches(pixels)
    assert want.dtype == torch.float32 and want.shape == (37, spec.PATCH_DIM)
    # channel-major: the first 1024 values of a patch are red
    assert torch.allclose(want[:, :1024], (torch.as_tensor(pixels[:, :1024]).float() / 255 - 0.485) / 0.229)
    assert torch.equal(processing_solo.normalize_patches(pixels), want)
    assert torch.equal(spec.normalize_patches(torch.as_tensor(pixels)), want)
    assert torch.equal(spec.normalize_patches(want), want)  # floats are already normalised


def test_model_input_path_normalises_like_spec(pixels):
    from megatron_solo.model.vision import VisionPatchEmbedding

    config = SimpleNamespace(hidden_size=spec.PATCH_DIM, params_dtype=torch.float32, use_cpu_initialization=True,
                             perform_initialization=False)
    emb = VisionPatchEmbedding(config)
    with torch.no_grad():
        emb.weight.copy_(torch.eye(spec.PATCH_DIM))
        got = emb.project(torch.as_tensor(pixels))
    assert torch.allclose(got, spec.normalize_patches(pixels), rtol=0, atol=1e-6)
