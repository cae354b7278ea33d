"""SOLO configuration: Mistral's fields plus the vision patch fields (arXiv 2407.06438).

Shipped next to ``modeling_solo.py`` in every exported SOLO checkpoint; loaded with
``AutoConfig.from_pretrained(dir, trust_remote_code=True)``.
"""

from transformers.models.mistral.configuration_mistral import MistralConfig


class SoloConfig(MistralConfig):
    r"""
    vision_patch_size (`int`, defaults to 32):
        Side of a square RGB image patch; one patch is ``3 * vision_patch_size**2`` values (channel-major).
    vision_start_token_id / vision_patch_token_id / vision_row_sep_token_id / vision_end_token_id (`int`):
        Ids of ``<vision>``, ``<vpatch>``, ``<vrow_sep>`` and ``</vision>`` in the extended tokenizer.
    """

    model_type = "solo"

    vocab_size: int = 33031
    rms_norm_eps: float = 1e-5
    vision_patch_size: int = 32
    vision_start_token_id: int = 32000
    vision_patch_token_id: int = 32001
    vision_row_sep_token_id: int = 32002
    vision_end_token_id: int = 32004

    @property
    def vision_patch_dim(self) -> int:
        return 3 * self.vision_patch_size * self.vision_patch_size


__all__ = ["SoloConfig"]
