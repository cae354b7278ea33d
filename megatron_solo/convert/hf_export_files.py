"""The non-weight files of a SOLO Hugging Face export: ``config.json``, ``generation_config.json``, the
remote-code files of ``hf_files/`` (copied as they are), and the tokenizer; and the tokenizer a
conversion uses.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from megatron_solo.convert.errors import ConversionError
from megatron_solo.convert.hf_files.processing_solo import JINJA_TEMPLATES, processor_config
from megatron_solo.data.chat_templates import TEMPLATES, missing_controls
from megatron_solo.data.tokenizer import (
    HF_CONFIG,
    SENTENCEPIECE,
    create_solo_tokenizer,
    derive_vocab,
    load_tokenizer,
    mistral_tokenizer_path,
    tokenizer_file,
)
from megatron_solo.spec import (
    BASE_VOCAB_SIZE,
    BOS_ID,
    EOS_ID,
    IM_END,
    IM_START,
    MISTRAL_VOCAB,
    SOLO_VOCAB_SIZE,
    UNK_ID,
    VISION_END,
    VISION_PATCH,
    VISION_ROW_SEP,
    VISION_START,
    SoloVocab,
)

HF_FILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_files")


def _same_base(a, b) -> bool:
    """Whether two tokenizers (base or SOLO-extended) share one base: same kind, base length, pieces."""
    va, vb = derive_vocab(a), derive_vocab(b)
    return (a.kind == b.kind and va.base_size == vb.base_size
            and all(a.id_to_piece(i) == b.id_to_piece(i) for i in range(va.base_size)))


def resolve_tokenizer(kind: str, hf_dir: str, tokenizer_model: str | None, work_dir: str) -> str:
    """Path of SOLO's extended tokenizer (``tokenizer.model`` or ``tokenizer.json``) for a conversion from
    ``hf_dir``: the directory's own tokenizer, extended here with SOLO's pieces (written into
    ``work_dir``) unless it already holds them (a SOLO export).

    ``tokenizer_model`` (or 'mistral-common' for the copy of Mistral's in that package) may name the
    same tokenizer as the directory's (base or extended); one with another base is refused. A directory
    without a tokenizer needs it, and the conversion says which one it used.
    """
    if tokenizer_model == "mistral-common":
        tokenizer_model = mistral_tokenizer_path()
    try:
        own = tokenizer_file(hf_dir)[1]
    except FileNotFoundError:
        own = None
    if tokenizer_model is None:
        if own is None:
            hint = " (Mistral's tokenizer.model, or 'mistral-common' for the copy in that package)" \
                if kind == "mistral" else ""
            raise ConversionError(f"converting a {kind} checkpoint needs --tokenizer-model{hint}: {hf_dir} holds no "
                                  "tokenizer.model or tokenizer.json")
        tokenizer_model = own
    if not os.path.exists(tokenizer_model):
        raise ConversionError(f"tokenizer model not found: {tokenizer_model}")
    try:
        tok = load_tokenizer(tokenizer_model)
    except Exception as e:  # noqa: BLE001 - sentencepiece/tokenizers raise RuntimeError/OSError/Exception
        what = "a SentencePiece model" if tokenizer_file(tokenizer_model)[0] == SENTENCEPIECE else "a tokenizer"
        raise ConversionError(f"{tokenizer_model}: not {what} ({e})") from None
    extended = tok.find_piece(VISION_START) is not None
    if kind == "solo" and not extended:
        want = f"SOLO's {SOLO_VOCAB_SIZE}-piece" if tok.kind == SENTENCEPIECE else "SOLO's"
        raise ConversionError(f"{tokenizer_model}: {tok.vocab_size} pieces; a SOLO checkpoint needs {want} tokenizer")
    if own is not None and os.path.abspath(own) != os.path.abspath(tokenizer_model):
        try:
            same = _same_base(tok, load_tokenizer(own))
        except Exception:  # noqa: BLE001 - the directory's own file does not parse: it cannot be compared
            same = False
        if not same:
            raise ConversionError(f"--tokenizer-model {tokenizer_model} differs from {hf_dir}'s own tokenizer "
                                  f"({os.path.basename(own)}): a model is converted with the tokenizer it was "
                                  "trained with (omit --tokenizer-model to use the directory's)")
    elif own is None:
        print(f"note: {hf_dir} has no tokenizer of its own; converting with --tokenizer-model {tokenizer_model} "
              "(it must be the one this model was trained with)", file=sys.stderr, flush=True)
    try:
        if extended:
            tok.check_solo_ids()
            return tokenizer_model
        return create_solo_tokenizer(tokenizer_model, work_dir)
    except ValueError as e:  # TokenizerError included
        raise ConversionError(f"{tokenizer_model}: {e}" if str(tokenizer_model) not in str(e) else str(e)) from None


def copy_tokenizer(path: str, out_dir: str) -> str:
    """A SOLO tokenizer file (and, for a ``tokenizer.json``, its ``tokenizer_config.json``) into
    ``out_dir``; returns the copied tokenizer file's path."""
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, os.path.basename(path))
    if os.path.abspath(path) != os.path.abspath(dst):
        shutil.copyfile(path, dst)
        if path.endswith(".json"):
            shutil.copyfile(os.path.join(os.path.dirname(path), HF_CONFIG), os.path.join(out_dir, HF_CONFIG))
    return dst


def write_tokenizer_files(out_dir: str, tokenizer_model: str, chat_template: str = "chatml") -> None:
    """SOLO's tokenizer as transformers loads it: a ``tokenizer.json`` (Llama-3, Qwen bases) is copied
    with its ``tokenizer_config.json`` (SOLO's pieces already in its ``added_tokens_decoder``); a
    ``tokenizer.model`` (Mistral) gets a LlamaTokenizer config that knows SOLO's special pieces. Either
    way the config carries the Jinja form of ``chat_template`` (the model's: ChatML, or a Llama-3 base's
    ``llama3``), so that the tokenizer's ``apply_chat_template`` gives the training data's ids (as the
    processor's does); solo-inst has no Jinja form (the processor's ``chat`` writes it)."""
    jinja = JINJA_TEMPLATES.get(chat_template)
    if tokenizer_model.endswith(".json"):
        copy_tokenizer(tokenizer_model, out_dir)
        path = os.path.join(out_dir, HF_CONFIG)
        with open(path) as f:
            cfg = json.load(f)
        cfg.pop("chat_template", None)
        if jinja:
            cfg["chat_template"] = jinja
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
        return
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
        # text after a special token without SentencePiece's "▁", as the training data encodes it
        # (data/encode.py): apply_chat_template's "<|im_start|>user\n" then gives the data's ids
        "legacy": False,
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
        **({"chat_template": jinja} if jinja else {}),
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)


def generation_stop_ids(vocab: SoloVocab) -> list[int]:
    """The ids generation stops at: EOS, the chat template's turn end ``<|im_end|>``, and a Llama-3 base's
    own turn end (the export's generation_config.json; tools/evaluate.py --load stops at the same)."""
    return [vocab.eos, vocab.im_end] + ([vocab.eot] if vocab.eot is not None else [])


def write_hf_support_files(out_dir: str, hf_config: dict, tokenizer_model: str,
                           vocab: SoloVocab = MISTRAL_VOCAB, row_separator: bool = True,
                           chat_template: str = "chatml") -> None:
    """config.json, generation_config.json (generation stops at EOS and at the chat templates' turn ends,
    ``<|im_end|>`` and a Llama-3 base's ``<|eot_id|>``), the remote-code files, the tokenizer and the
    processor's config (its image layout: ``row_separator``, the model's data's; its default template:
    ``chat_template``, the one the model was tuned with)."""
    for fname in ("configuration_solo.py", "modeling_solo.py", "processing_solo.py"):
        shutil.copyfile(os.path.join(HF_FILES_DIR, fname), os.path.join(out_dir, fname))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": vocab.bos, "eos_token_id": generation_stop_ids(vocab), "do_sample": False,
                   "max_new_tokens": 256}, f, indent=2)
    write_tokenizer_files(out_dir, tokenizer_model, chat_template)
    # AutoProcessor.from_pretrained(export, trust_remote_code=True) -> processing_solo.SoloProcessor
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump(processor_config(None if vocab == MISTRAL_VOCAB else vocab.to_dict(), row_separator,
                                   chat_template_name=chat_template), f, indent=2)


def export_chat_template(name: str | None, recorded: str | None, vocab: SoloVocab) -> str:
    """The export's default chat template: ``name`` (asked for), else ``recorded`` (the checkpoint's: its chat
    data's), else chatml; one the vocabulary cannot write (llama3 over a base without its header tokens)
    is a ConversionError."""
    name = name or recorded or "chatml"
    if name not in TEMPLATES:
        raise ConversionError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    missing = missing_controls(TEMPLATES[name], vocab)
    if missing:
        raise ConversionError(f"chat template {name} needs the base's own {', '.join(missing)}, which this "
                              "checkpoint's vocabulary does not have: export with --chat-template chatml")
    return name


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
