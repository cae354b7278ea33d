"""The SOLO model on megatron-core: presets, config, layer specs, patch embedding, batch glue, loss.

See docs/MODEL.md. Importing this package changes nothing global; on a CPU machine the entry point
calls ``megatron_solo.cpu_backend.ensure()`` before running megatron-core.
"""

from megatron_solo.model.batch import (
    document_ids,
    model_forward_kwargs,
    packed_causal_mask,
    pad_lengths,
    position_ids_from_doc_lengths,
    prepare_batch,
    to_thd_batch,
)
from megatron_solo.model.config import (
    PRESETS,
    SoloModelArgs,
    build_transformer_config,
    check_fp8,
    fp8_thd_pad_multiple,
    te_available,
    use_te_default,
)
from megatron_solo.model.loss import solo_loss_func
from megatron_solo.model.solo_model import SoloModel, build_solo_model
from megatron_solo.model.specs import (
    SoloDotProductAttention,
    SoloRMSNorm,
    get_block_spec,
    get_layer_spec,
)
from megatron_solo.model.vision import VisionPatchEmbedding
from megatron_solo.spec import normalize_patches

__all__ = [
    "PRESETS", "SoloModelArgs", "build_transformer_config", "check_fp8", "fp8_thd_pad_multiple",
    "te_available", "use_te_default", "get_layer_spec", "get_block_spec", "SoloRMSNorm",
    "SoloDotProductAttention", "VisionPatchEmbedding", "normalize_patches", "SoloModel",
    "build_solo_model", "model_forward_kwargs", "prepare_batch", "to_thd_batch", "packed_causal_mask",
    "document_ids", "position_ids_from_doc_lengths", "pad_lengths", "solo_loss_func",
]
