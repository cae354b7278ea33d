"""The base-model families a SOLO model can start from: one row of data each, no per-family code paths.

A row says how a family's Hugging Face ``config.json`` is recognised, which megatron-core options its
architecture switches on, and which transformers class is its reference. Everything a model's shapes
and options depend on is then read from the base's own ``config.json`` (``hf_config.py``) into
:class:`~megatron_solo.model.config.SoloModelArgs`; nothing is inferred from a name. The conversion
table (``convert/mapping.py``) picks its optional rows (QKV bias, q/k norm, an untied output layer) by
the same switches, so a new dense family is a new row here; an MoE family would add its own switches
and rows the same way.

Plain Python: no torch, megatron or transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Family:
    """One base-model family (dense decoder, SwiGLU MLP, RMSNorm, RoPE)."""

    name: str
    #: ``model_type`` values of its ``config.json`` and the ``architectures`` entries that name it
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    #: transformers' causal-LM class for this family: the reference of ``--verify`` and the tests
    hf_class: str
    #: megatron-core ``add_qkv_bias``: biases on Q, K and V only (Qwen2's attention; fixed by the class)
    qkv_bias: bool = False
    #: megatron-core ``qk_layernorm``: per-head RMSNorm on queries and keys before RoPE (Qwen3)
    qk_layernorm: bool = False
    #: config.json key that switches the sliding window on; None: ``sliding_window`` applies as given
    sliding_window_switch: Optional[str] = None
    #: RoPE types of ``rope_parameters``/``rope_scaling`` this family may carry
    rope_types: tuple[str, ...] = ("default",)
    #: the tokenizer file a base directory of this family holds
    tokenizer_file: str = "tokenizer.json"


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mistral", ("mistral",), ("MistralForCausalLM",), "MistralForCausalLM",
               tokenizer_file="tokenizer.model"),
        # Llama-3.x: GQA, theta 500000, the "llama3" RoPE scaling from 3.1 on; tied embeddings in 3.2-1B/3B.
        Family("llama", ("llama",), ("LlamaForCausalLM",), "LlamaForCausalLM", rope_types=("default", "llama3")),
        # Qwen2/2.5: Q/K/V biases; the window only when use_sliding_window is set (never in released bases).
        Family("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), "Qwen2ForCausalLM", qkv_bias=True,
               sliding_window_switch="use_sliding_window"),
        # Qwen3: q/k RMSNorm per head, head_dim independent of hidden/heads.
        Family("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), "Qwen3ForCausalLM", qk_layernorm=True,
               sliding_window_switch="use_sliding_window"),
    )
}


def family_of_hf_config(cfg: dict) -> Optional[Family]:
    """The family whose ``model_type`` (else one of whose ``architectures``) the config names; None if none."""
    model_type = cfg.get("model_type")
    for f in FAMILIES.values():
        if model_type in f.model_types:
            return f
    archs = cfg.get("architectures") or []
    for f in FAMILIES.values():
        if any(a in f.architectures for a in archs):
            return f
    return None


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]
