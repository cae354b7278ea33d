"""Which parameters are which, by name alone (no torch): the rules the optimizer's groups, the dry run,
checkpoint loading and the conversion share."""

from __future__ import annotations

import re

# A vision expert's parameter: a decoder layer's "vision_*" module (model/vision_experts.py), e.g.
# decoder.layers.3.vision_mlp.linear_fc1.weight or decoder.layers.3.self_attention.vision_linear_qkv.weight
# (with or without DDP's "module." prefix; without the layer number in a checkpoint's stacked keys); its text
# twin is the same name without "vision_".
_EXPERT_PARAMETER = re.compile(r"(^|\.)decoder\.layers\.(\d+\.)?(self_attention\.)?vision_")


def is_vision_expert_parameter(name: str) -> bool:
    return _EXPERT_PARAMETER.search(name) is not None


def text_twin_name(expert_name: str) -> str:
    """The text twin of a vision expert's parameter (what it is copied from when it starts)."""
    m = _EXPERT_PARAMETER.search(expert_name)
    if m is None:
        raise ValueError(f"{expert_name} is not a vision expert's parameter")
    return expert_name[: m.end() - len("vision_")] + expert_name[m.end():]


# LoRA (model/lora.py): the layers ``--lora-targets`` names (megatron-core's own module names) and the
# adapters' parameters, ``<layer>.lora_a`` and ``<layer>.lora_b`` beside the layer's ``weight``.
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "vision_patch_embed")
DEFAULT_LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
LORA_PARAMS = ("lora_a", "lora_b")


def is_lora_parameter(name: str) -> bool:
    """An adapter's parameter (with or without DDP's ``module.`` prefix, in a checkpoint's stacked keys too)."""
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


def adapted_weight_name(lora_name: str) -> str:
    """``...linear_qkv.lora_a`` -> ``...linear_qkv.weight``: the weight an adapter adds to."""
    return lora_name.rsplit(".", 1)[0] + ".weight"
