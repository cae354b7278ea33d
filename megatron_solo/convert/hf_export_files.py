"""The non-weight files of a SOLO Hugging Face export: ``config.json``, ``generation_config.json``, the
remote-code files of ``hf_files/`` (copied as they are), and the tokenizer; and the tokenizer a
conversion uses.
"""

from __future__ import annotations

import json
import os
import shutil

from megatron_solo.convert.errors import ConversionError
from megatron_solo.spec import (
    BASE_VOCAB_SIZE,
    BOS_ID,
    EOS_ID,
    IM_END,
    IM_START,
    SOLO_IDS,
    SOLO_VOCAB_SIZE,
    UNK_ID,
    VISION_END,
    VISION_PATCH,
    VISION_ROW_SEP,
    VISION_START,
)

HF_FILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_files")


def resolve_tokenizer(kind: str, hf_dir: str, tokenizer_model: str | None, work_dir: str) -> str:
    """Path of SOLO's extended tokenizer.model for a conversion from ``hf_dir``.

    From a Mistral: ``tokenizer_model`` is Mistral's 32000-piece model (or 'mistral-common'), extended
    here with SOLO's pieces (written into ``work_dir``); a model that already holds them is used as is.
    From a SOLO: the directory's own tokenizer.model (or ``tokenizer_model``), which must be SOLO's.
    """
    from megatron_solo.data.tokenizer import SoloTokenizer, create_solo_tokenizer, mistral_tokenizer_path

    if tokenizer_model == "mistral-common":
        tokenizer_model = mistral_tokenizer_path()
    if tokenizer_model is None:
        candidate = os.path.join(hf_dir, "tokenizer.model")
        if kind == "mistral" and not os.path.isfile(candidate):
            raise ConversionError("converting a Mistral checkpoint needs --tokenizer-model (Mistral's "
                                  "tokenizer.model, or 'mistral-common' for the copy in that package)")
        tokenizer_model = candidate
    if not os.path.isfile(tokenizer_model):
        raise ConversionError(f"tokenizer model not found: {tokenizer_model}")
    try:
        tok = SoloTokenizer(tokenizer_model)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on a file it cannot parse
        raise ConversionError(f"{tokenizer_model}: not a SentencePiece model ({e})") from None
    if tok.vocab_size == SOLO_VOCAB_SIZE:
        try:
            tok.check_solo_ids()
        except ValueError as e:
            raise ConversionError(str(e)) from None
        return tokenizer_model
    if kind == "solo":
        raise ConversionError(f"{tokenizer_model}: {tok.vocab_size} pieces; a SOLO checkpoint needs SOLO's "
                              f"{SOLO_VOCAB_SIZE}-piece tokenizer")
    try:
        return create_solo_tokenizer(tokenizer_model, work_dir)
    except ValueError as e:
        raise ConversionError(f"{tokenizer_model}: {e}") from None


def write_tokenizer_files(out_dir: str, tokenizer_model: str) -> None:
    """tokenizer.model plus a LlamaTokenizer config that knows SOLO's special pieces."""
    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    added = {}
    for i in [UNK_ID, BOS_ID, EOS_ID, *range(BASE_VOCAB_SIZE, sp.get_piece_size())]:
        added[str(i)] = {"content": sp.id_to_piece(i), "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "legacy": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": 1000000000000000019884624838656,
        "added_tokens_decoder": added,
        "extra_special_tokens": {
            "vision_start_token": VISION_START, "vision_patch_token": VISION_PATCH,
            "vision_row_sep_token": VISION_ROW_SEP, "vision_end_token": VISION_END,
            "im_start_token": IM_START, "im_end_token": IM_END,
        },
        "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {},
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)


def write_hf_support_files(out_dir: str, hf_config: dict, tokenizer_model: str) -> None:
    """config.json, generation_config.json, the remote-code files and the tokenizer."""
    for fname in ("configuration_solo.py", "modeling_solo.py", "processing_solo.py"):
        shutil.copyfile(os.path.join(HF_FILES_DIR, fname), os.path.join(out_dir, fname))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, SOLO_IDS.im_end], "do_sample": False,
                   "max_new_tokens": 256}, f, indent=2)
    write_tokenizer_files(out_dir, tokenizer_model)


def load_export_processor(hf_dir: str):
    """Import an export's own ``processing_solo.py`` (what a user of the HF directory runs)."""
    import importlib.util

    path = os.path.join(hf_dir, "processing_solo.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir} has no processing_solo.py (not a SOLO export?)")
    spec = importlib.util.spec_from_file_location("processing_solo_export", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
