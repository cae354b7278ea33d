"""SOLO configuration: the base decoder's fields plus the vision patch fields (arXiv 2407.06438).

Shipped next to ``modeling_solo.py`` in every exported SOLO checkpoint; loaded with
``AutoConfig.from_pretrained(dir, trust_remote_code=True)``. ``SoloConfig`` is SOLO-7B's (Mistral's
fields); an export of a SOLO model on another base (``solo_family`` in its config.json) names that
family's class in its ``auto_map``: ``SoloLlamaConfig``, ``SoloQwen2Config``, ``SoloQwen3Config``
(each defined when the installed transformers has the family).
"""

import importlib

from transformers.models.mistral.configuration_mistral import MistralConfig


class _VisionFields:
    """SOLO's fields, the same on every base (ids: Mistral's; an export writes its own)."""

    vision_patch_size: int = 32
    vision_start_token_id: int = 32000
    vision_patch_token_id: int = 32001
    vision_row_sep_token_id: int = 32002
    vision_end_token_id: int = 32004
    # the image layout of the model's training data: a <vrow_sep> between rows of patches (SOLO's); an
    # export of a model trained without them writes false (SAIL's layout), and its processor follows it
    vision_row_separator: bool = True
    vision_experts: str = "none"  # "ffn" / "full": image tokens' own modules in every layer (modeling_solo.py)
    # The SOLO line's image choices (SOLO's by default; an export with others names them in config.json):
    # "causal" | "bidirectional" (the tokens of one <vision>...</vision> block see each other), "1d" |
    # "mrope" (multimodal RoPE: (temporal, row, column) positions, ``mrope_section`` channel pairs each).
    image_attention: str = "causal"
    image_positions: str = "1d"
    mrope_section: list | None = None
    vision_frame_sep_token_id: int = 32003

    @property
    def vision_patch_dim(self) -> int:
        return 3 * self.vision_patch_size * self.vision_patch_size


def _family_config(module: str, base: str):
    """``Solo<base>`` over transformers' ``<base>Config``, or None where this transformers lacks it."""
    try:
        base_cls = getattr(importlib.import_module(f"transformers.models.{module}.configuration_{module}"),
                           f"{base}Config")
    except (ImportError, AttributeError):
        return None
    cls = type(f"Solo{base}Config", (_VisionFields, base_cls), {"model_type": "solo", "__module__": __name__})
    cls.__qualname__ = cls.__name__
    return cls


SoloLlamaConfig = _family_config("llama", "Llama")
SoloQwen2Config = _family_config("qwen2", "Qwen2")
SoloQwen3Config = _family_config("qwen3", "Qwen3")  # transformers >= 4.51


class SoloConfig(_VisionFields, MistralConfig):
    r"""
    vision_patch_size (`int`, defaults to 32):
        Side of a square RGB image patch; one patch is ``3 * vision_patch_size**2`` values (channel-major).
    vision_row_separator (`bool`, defaults to True):
        Whether the model's images were laid out with ``<vrow_sep>`` between rows of patches (SOLO) or
        without (SAIL); the processor lays images out the same way.
    vision_start_token_id / vision_patch_token_id / vision_row_sep_token_id / vision_frame_sep_token_id /
    vision_end_token_id (`int`):
        Ids of ``<vision>``, ``<vpatch>``, ``<vrow_sep>``, ``<vframe_sep>`` and ``</vision>`` in the extended tokenizer.
    image_attention (`str`, defaults to "causal"): "bidirectional" lets the tokens of one image block see each other.
    image_positions (`str`, defaults to "1d"): "mrope" gives patches (temporal, row, column) rotary positions,
        split over the rotary channels by ``mrope_section``.
    """

    model_type = "solo"

    vocab_size: int = 33031
    rms_norm_eps: float = 1e-5


__all__ = ["SoloConfig", "SoloLlamaConfig", "SoloQwen2Config", "SoloQwen3Config"]
