"""SOLO architecture arguments, presets, and the megatron-core ``TransformerConfig`` built from them.

``SoloModelArgs`` holds only the architecture (what a checkpoint's shapes depend on); how the model is
laid out over devices (TP/PP/SP/CP), its precision (bf16/fp16/FP8) and recomputation are arguments of
:func:`build_transformer_config`, so one set of model args serves every parallel layout.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_solo import cpu_backend
from megatron_solo.convert.families import FAMILIES
from megatron_solo.model.image_blocks import (
    IMAGE_ATTENTION_CHOICES,
    IMAGE_POSITIONS_CHOICES,
    ImageTokens,
    mrope_section,
)
from megatron_solo.presets import PRESETS
from megatron_solo.spec import MAKE_VOCAB_SIZE_DIVISIBLE_BY, PATCH_DIM, SOLO_IDS, SOLO_VOCAB_SIZE, pad_vocab_size

VISION_EXPERTS_CHOICES = ("none", "ffn", "full")
@dataclass
class SoloModelArgs:
    """Architecture of a SOLO model: a base decoder (``family``, see ``convert/families.py``) plus a
    3072 -> hidden patch projection.

    JSON-serialisable with ``dataclasses.asdict``; ``SoloModelArgs(**d)`` restores it (a checkpoint
    written before the family fields existed restores as Mistral, which it is).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int = SOLO_VOCAB_SIZE  # real vocabulary (tokenizer pieces); the embedding is padded
    max_position_embeddings: int = 32768
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    sliding_window: Optional[int] = 4096  # tokens a query sees, itself included (HF Mistral's meaning)
    patch_dim: int = PATCH_DIM
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY
    # The base's family and the architecture switches read from its config.json (convert/hf_config.py).
    family: str = "mistral"
    qkv_bias: bool = False  # megatron-core add_qkv_bias (Qwen2)
    qk_layernorm: bool = False  # per-head q/k RMSNorm (Qwen3)
    tie_word_embeddings: bool = False  # output layer = input embedding (Llama-3.2-1B/3B, small Qwens)
    rope_scaling: Optional[str] = None  # None or "llama3" (Llama-3.1+; megatron-core's rope_scaling)
    rope_scaling_factor: float = 8.0
    # <vpatch>'s id in SOLO's vocabulary over the base (SoloVocab.vision_patch; Mistral's 32001): the
    # positions the patch embedding is added at.
    vision_patch_id: int = SOLO_IDS.vision_patch
    # Modality-specific weights for the image tokens (model/vision_experts.py): "none" (SOLO's dense
    # layer), "ffn" (own pre-MLP norm and MLP) or "full" (also own input norm, QKV and output projection).
    vision_experts: str = "none"
    # The SOLO line's image choices (model/image_blocks.py, docs/MODEL.md); SOLO's are the defaults, which
    # is also what a checkpoint saved before they existed restores as.
    image_attention: str = "causal"  # or "bidirectional": the tokens of one image block see each other
    image_positions: str = "1d"  # or "mrope": megatron-core's multimodal RoPE (temporal, row, column)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; choose one of {sorted(FAMILIES)}")
        if self.rope_scaling not in (None, "llama3"):
            raise ValueError(f"rope_scaling must be None or 'llama3', got {self.rope_scaling!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.vision_experts not in VISION_EXPERTS_CHOICES:
            raise ValueError(f"vision_experts must be one of {VISION_EXPERTS_CHOICES}, got {self.vision_experts!r}")
        if self.image_attention not in IMAGE_ATTENTION_CHOICES:
            raise ValueError(f"image_attention must be one of {IMAGE_ATTENTION_CHOICES}, got {self.image_attention!r}")
        if self.image_positions not in IMAGE_POSITIONS_CHOICES:
            raise ValueError(f"image_positions must be one of {IMAGE_POSITIONS_CHOICES}, got {self.image_positions!r}")
        if self.image_positions == "mrope" and self.rope_scaling is not None:
            raise ValueError(f"image positions 'mrope' (megatron-core's MultimodalRotaryEmbedding) have no "
                             f"{self.rope_scaling} RoPE scaling; use image positions '1d' with this base")
        if self.patch_dim != PATCH_DIM:
            raise ValueError(f"SOLO patches are 3x32x32 = {PATCH_DIM} values, got patch_dim={self.patch_dim}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SoloModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown SoloModelArgs fields: {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Megatron's rule: a multiple of ``make_vocab_size_divisible_by * TP``."""
        return pad_vocab_size(self.vocab_size, tensor_model_parallel_size, self.make_vocab_size_divisible_by)

    @property
    def image_tokens(self) -> ImageTokens:
        return ImageTokens.from_patch_id(self.vision_patch_id)

    @property
    def mrope_section(self) -> Optional[list[int]]:
        """megatron-core's ``mrope_section`` under image positions 'mrope', else None."""
        return mrope_section(self.kv_channels) if self.image_positions == "mrope" else None

    @property
    def window_size(self) -> Optional[tuple[int, int]]:
        """megatron-core/TE ``(left, right)`` window: HF's ``sliding_window`` w sees w tokens -> (w-1, 0)."""
        return None if self.sliding_window is None else (self.sliding_window - 1, 0)




def te_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports (never on a CPU-only machine)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that fails to load its CUDA library
        return False
    return True


def use_te_default() -> bool:
    """The TE spec is used when TE imports and a GPU is present; the local spec otherwise."""
    return te_available() and cpu_backend.cuda_available()


FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


def check_fp8(fp8: Optional[str], fp8_recipe: Optional[str], use_te: bool) -> None:
    """Refuse FP8 settings that cannot work, with a message a user can act on, at start-up."""
    if fp8 is None:
        return
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"fp8 format must be one of {FP8_FORMATS}, got {fp8!r}")
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"fp8 recipe must be one of {FP8_RECIPES}, got {fp8_recipe!r}")
    if not use_te:
        why = (
            "Transformer Engine is not importable (pip install transformer-engine[pytorch] on a CUDA machine)"
            if not te_available()
            else "a CUDA GPU is required (this process has none)"
            if not cpu_backend.cuda_available()
            else "the local (non-TE) layer spec was requested"
        )
        raise ValueError(
            f"FP8 training (fp8={fp8!r}, recipe={fp8_recipe!r}) runs through Transformer Engine's layer spec, "
            f"but {why}. Drop the FP8 settings to train in bf16 with the local spec."
        )


def build_transformer_config(
    model_args: SoloModelArgs,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    sequence_parallel: bool = False,
    context_parallel_size: int = 1,
    params_dtype: Optional[torch.dtype] = None,
    bf16: bool = False,
    fp16: bool = False,
    fp8: Optional[str] = None,
    fp8_recipe: str = "delayed",
    fp8_margin: int = 0,
    fp8_interval: int = 1,
    fp8_amax_history_len: int = 1,
    fp8_amax_compute_algo: str = "most_recent",
    fp8_wgrad: bool = True,
    fp8_param: bool = False,
    first_last_layers_bf16: bool = False,
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
    recompute_modules: Optional[list[str]] = None,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    calculate_per_token_loss: bool = True,
    use_te: bool = False,
    **extra,
):
    """megatron-core ``TransformerConfig`` for a SOLO backbone of ``model_args.family``.

    ``use_te`` is the caller's decision, never re-derived here (a run decides it once from
    ``--transformer-impl``: ``training/config.py``; default: the local spec); it only decides whether FP8 is possible; the
    layer spec itself comes from :func:`megatron_solo.model.get_layer_spec`. On the CPU backend the
    fields of :func:`cpu_backend.cpu_config_overrides` are applied last. ``extra`` goes to
    ``TransformerConfig`` unchanged (e.g. ``variable_seq_lengths``, ``tp_comm_overlap``).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if bf16 and fp16:
        raise ValueError("choose at most one of bf16 and fp16")
    check_fp8(fp8, fp8_recipe, use_te)
    if sequence_parallel and tensor_model_parallel_size == 1:
        sequence_parallel = False  # megatron-core's rule: SP is meaningless without TP
    if params_dtype is None:
        params_dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32

    kw = dict(
        num_layers=model_args.num_layers,
        hidden_size=model_args.hidden_size,
        ffn_hidden_size=model_args.ffn_hidden_size,
        num_attention_heads=model_args.num_attention_heads,
        num_query_groups=model_args.num_query_groups,
        kv_channels=model_args.kv_channels,
        init_method_std=model_args.init_method_std,
        layernorm_epsilon=model_args.norm_epsilon,
        window_size=model_args.window_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=model_args.qkv_bias,
        qk_layernorm=model_args.qk_layernorm,
        rotary_interleaved=False,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel,
        context_parallel_size=context_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        fp16=fp16,
        calculate_per_token_loss=calculate_per_token_loss,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
    )
    if model_args.mrope_section is not None:
        kw["mrope_section"] = model_args.mrope_section
    if recompute_modules is not None:
        kw["recompute_modules"] = list(recompute_modules)
    if fp8 is not None:
        kw.update(
            fp8=fp8,
            fp8_recipe=fp8_recipe,
            fp8_margin=fp8_margin,
            fp8_interval=fp8_interval,
            fp8_amax_history_len=fp8_amax_history_len,
            fp8_amax_compute_algo=fp8_amax_compute_algo,
            fp8_wgrad=fp8_wgrad,
            fp8_param=fp8_param,
            first_last_layers_bf16=first_last_layers_bf16,
        )
    kw.update(extra)
    kw.update(cpu_backend.cpu_config_overrides())
    return TransformerConfig(**kw)


def fp8_thd_pad_multiple(config) -> int:
    """Per-document length multiple for packed THD batches (TE path).

    FP8 GEMMs need token counts that are multiples of 16 (32 for MXFP8; megatron-core's
    ``get_fp8_align_size``); context parallelism splits each document into ``2 * CP`` chunks. Each
    document of a packed THD batch is padded to the least common multiple of what applies, as
    NeMo's packed-sequence SFT does (``cu_seqlens_padded``). 1 means no padding.
    """
    multiple = 1
    if getattr(config, "fp8", None):
        multiple = 32 if config.fp8_recipe == "mxfp8" else 16
    cp = getattr(config, "context_parallel_size", 1) or 1
    if cp > 1:
        multiple = math.lcm(multiple, 2 * cp)
    return multiple
