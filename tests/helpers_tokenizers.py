"""SOLO's tokenizers over the real base tokenizers of :mod:`megatron_solo.demo.base_tokenizers` (Qwen3's and
Llama-3.2's ``tokenizer.json``, installed once per clone into ``.cache/``)."""

import os

from megatron_solo.demo.base_tokenizers import PACKAGES, base_tokenizer_dirs  # noqa: F401 (PACKAGES: tests' keys)


def solo_hf_tokenizers(out: str) -> dict[str, str]:
    """The bases (``qwen``, ``llama``: directories) and SOLO's tokenizers over them (``solo_qwen``,
    ``solo_llama``: tokenizer.json paths), written as the tool writes them."""
    from megatron_solo.data.tokenizer import create_solo_tokenizer

    bases = base_tokenizer_dirs(os.path.join(out, "base"))
    return {**bases, **{f"solo_{k}": create_solo_tokenizer(d, os.path.join(out, f"solo_{k}")) for k, d in bases.items()}}
