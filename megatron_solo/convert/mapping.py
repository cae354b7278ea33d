"""The one declarative table that maps megatron_solo parameters to Hugging Face tensors (SOLO exports and
the bases of every family in ``model/families.py``).

Every direction goes through :data:`MAPPINGS`: import (HF -> Megatron), export (Megatron -> HF) and
verification (re-read and compare). Each row pairs one Megatron parameter (full, unsharded, TP=1
layout; megatron-core's ``dist_checkpointing`` reshards it to any TP/PP on load) with one or more HF
tensors and names the transform between them:

=====================  =====================================================================
transform              what it does
=====================  =====================================================================
``identity``           same tensor on both sides
``vocab_pad``          Megatron's embedding/output rows are padded to ``padded_vocab_size``;
                       HF keeps the real vocabulary. Import keeps the source's first
                       ``vocab_size`` rows (a Qwen base pads its matrices past its tokenizer:
                       those rows are not tokens) and appends rows (see
                       :func:`init_extra_vocab_rows`), export drops them.
``qkv_gqa``            Megatron fuses Q, K, V into ``linear_qkv`` grouped per KV group:
                       for each of the ``G`` groups, its ``H/G`` query heads, then its key head,
                       then its value head. HF keeps ``q_proj``, ``k_proj``, ``v_proj`` apart.
                       Weights and (Qwen2's) biases alike.
``gated_mlp``          Megatron's ``linear_fc1`` is ``[gate; up]`` stacked on dim 0 (SiLU on the
                       first half); HF keeps ``gate_proj`` and ``up_proj`` apart.
=====================  =====================================================================

Rows that exist only for some architectures name the switch they need (``when``: ``qkv_bias``,
``qk_layernorm``, ``untied``, ``ffn_experts``, ``full_experts``), a field of :class:`ConversionShapes`
set from the model's arguments; the family itself never appears here.

The vision experts' rows (``--vision-experts ffn|full``, docs/MODEL.md) name their text twin's HF
tensors (``copies``): a source without the expert tensors (a base, a dense SOLO export) gives each
expert a copy of its twin, which is how EVEv2 and Mono-InternVL initialise them.

Nothing here imports megatron: the table and transforms are plain torch, so HF-side tools (and
tests) use them without paying megatron's import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from megatron_solo.spec import PATCH_DIM


@dataclass(frozen=True)
class ConversionShapes:
    """The few numbers the transforms need (read from SoloModelArgs / the HF config)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int  # real vocabulary kept on the HF side (33031 for SOLO)
    padded_vocab_size: int  # rows of Megatron's embedding and output layer
    hf_vocab_rows: int | None = None  # rows of the HF matrices when they pad past vocab_size (Qwen bases)
    qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    vision_experts: str = "none"  # "none", "ffn" or "full" (SoloModelArgs.vision_experts)

    def __post_init__(self):
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"{self.num_attention_heads} attention heads are not divisible into "
                             f"{self.num_query_groups} query groups")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded vocab {self.padded_vocab_size} < vocab {self.vocab_size}")
        if self.hf_vocab_rows is not None and self.hf_vocab_rows < self.vocab_size:
            raise ValueError(f"HF vocabulary rows {self.hf_vocab_rows} < vocab {self.vocab_size}")

    @property
    def hf_rows(self) -> int:
        return self.vocab_size if self.hf_vocab_rows is None else self.hf_vocab_rows

    @property
    def untied(self) -> bool:
        return not self.tie_word_embeddings

    @property
    def ffn_experts(self) -> bool:
        """The image tokens' own pre-MLP norm and MLP (``ffn`` and ``full``)."""
        return self.vision_experts in ("ffn", "full")

    @property
    def full_experts(self) -> bool:
        """Also their own input norm, QKV and output projection (``full``)."""
        return self.vision_experts == "full"

    @property
    def full_experts_qkv_bias(self) -> bool:
        return self.full_experts and self.qkv_bias

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


# --------------------------------------------------------------------------------------------------
# Transforms. `to_hf(megatron_tensor, shapes) -> tuple[hf tensors]`, `to_megatron(hf tensors, shapes)`.
# `hf_shapes(shapes)` / `megatron_shape(shapes)` describe the tensors without computing them, so the
# exporter can lay out safetensors headers before any data is converted (streaming) and the importer
# can check a checkpoint's shapes against its config before it builds a model.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    name: str
    to_hf: Callable[[torch.Tensor, ConversionShapes], tuple[torch.Tensor, ...]]
    to_megatron: Callable[[tuple[torch.Tensor, ...], ConversionShapes], torch.Tensor]
    # The same import with the source tensors read where the result needs them: ``(read, source_shapes,
    # dtype, shapes)``, ``read(i, out)`` fills ``out`` with source ``i``'s first ``len(out)`` rows and returns
    # it. A streaming import uses it to hold one copy of a large matrix instead of the sources plus the
    # result, and to skip a copy of every byte (None: read the sources, then ``to_megatron``).
    read_to_megatron: Callable[[Callable[[int, torch.Tensor], torch.Tensor], tuple[tuple[int, ...], ...],
                                torch.dtype, ConversionShapes], torch.Tensor] | None = None


def _identity_to_hf(t, s):
    return (t,)


def _identity_to_megatron(ts, s):
    return ts[0]


def _vocab_to_hf(t, s):
    if t.shape[0] != s.padded_vocab_size:
        raise ValueError(f"expected {s.padded_vocab_size} vocabulary rows, got {t.shape[0]}")
    return (t[: s.vocab_size],)


def init_extra_vocab_rows(source: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Rows appended after a source vocabulary: each is the mean of the source's rows.

    Used for SOLO's 1031 new pieces when starting from Mistral and for Megatron's padding rows.
    The mean embedding keeps the new tokens' inputs in distribution, and the mean output row gives
    every new piece the average logit, so the initial loss on base text is not disturbed (Hewitt,
    "Initializing New Word Embeddings for Pretrained Language Models", 2021; also what
    ``transformers``' ``resize_token_embeddings(mean_resizing=True)`` centres on).
    """
    total = torch.zeros(source.shape[1:], dtype=torch.float64)
    for rows in _float64_row_chunks(source):
        total += rows.sum(dim=0)
    mean = (total / source.shape[0]).to(source.dtype)
    return mean.unsqueeze(0).expand(num_rows, -1)


# Rows reduced at a time: a float64 copy of a whole 151,669 x 4096 embedding (Qwen3-8B) is 5 GB, a third
# of the bf16 model; 4096 rows of it are 128 MiB.
_REDUCE_ROWS = 4096


def _float64_row_chunks(t: torch.Tensor):
    for start in range(0, t.shape[0], _REDUCE_ROWS):
        yield t[start:start + _REDUCE_ROWS].to(torch.float64)


def _vocab_to_megatron(ts, s):
    (t,) = ts
    t = t[: s.vocab_size]  # rows past the tokenizer's length (a Qwen base's padding) are not tokens
    if t.shape[0] > s.padded_vocab_size:
        raise ValueError(f"source has {t.shape[0]} vocabulary rows, more than the padded {s.padded_vocab_size}")
    extra = s.padded_vocab_size - t.shape[0]
    if extra == 0:
        return t
    return torch.cat([t, init_extra_vocab_rows(t, extra)], dim=0)


def _vocab_read_to_megatron(read, source_shapes, dtype, s):
    """:func:`_vocab_to_megatron`, bit for bit, with the source's rows read straight into the padded
    matrix: a Qwen3-8B embedding is 1.2 GB, and the source plus ``torch.cat``'s result were two of it."""
    (source_shape,) = source_shapes
    rows = min(source_shape[0], s.vocab_size)
    if rows > s.padded_vocab_size:
        raise ValueError(f"source has {rows} vocabulary rows, more than the padded {s.padded_vocab_size}")
    out = torch.empty((s.padded_vocab_size, *source_shape[1:]), dtype=dtype)
    kept = read(0, out[:rows])
    if rows < s.padded_vocab_size:
        out[rows:] = init_extra_vocab_rows(kept, s.padded_vocab_size - rows)
    return out


def _qkv_to_hf(t, s):
    g, hpg, d, rest = s.num_query_groups, s.heads_per_group, s.head_dim, t.shape[1:]  # rest: (h,) or () (bias)
    grouped = t.reshape(g, (hpg + 2) * d, -1)
    q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
    return q.reshape(g * hpg * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)


def _qkv_to_megatron(ts, s):
    q, k, v = ts
    g, hpg, d, rest = s.num_query_groups, s.heads_per_group, s.head_dim, q.shape[1:]
    grouped = torch.cat([q.reshape(g, hpg * d, -1), k.reshape(g, d, -1), v.reshape(g, d, -1)], dim=1)
    return grouped.reshape(-1, *rest)


def _gated_to_hf(t, s):
    gate, up = torch.chunk(t, 2, dim=0)
    return gate, up


def _gated_to_megatron(ts, s):
    return torch.cat(ts, dim=0)


def _gated_read_to_megatron(read, source_shapes, dtype, s):
    """:func:`_gated_to_megatron` with gate and up read straight into their halves (no concatenating copy)."""
    gate, up = source_shapes
    out = torch.empty((gate[0] + up[0], *gate[1:]), dtype=dtype)
    read(0, out[: gate[0]])
    read(1, out[gate[0]:])
    return out


IDENTITY = Transform("identity", _identity_to_hf, _identity_to_megatron)
VOCAB_PAD = Transform("vocab_pad", _vocab_to_hf, _vocab_to_megatron, _vocab_read_to_megatron)
QKV_GQA = Transform("qkv_gqa", _qkv_to_hf, _qkv_to_megatron)
GATED_MLP = Transform("gated_mlp", _gated_to_hf, _gated_to_megatron, _gated_read_to_megatron)


@dataclass(frozen=True)
class Mapping:
    """One row of the table. ``{i}`` in a name stands for the (global) layer index."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    # Shapes, as functions of ConversionShapes: the Megatron tensor and each HF tensor.
    megatron_shape: Callable[[ConversionShapes], tuple[int, ...]]
    hf_shapes: Callable[[ConversionShapes], tuple[tuple[int, ...], ...]]
    # Present only in SOLO checkpoints (absent from a base): created at import from a base.
    solo_only: bool = False
    # The ConversionShapes switch this row needs ("qkv_bias", "qk_layernorm", "untied", ...); None: always.
    when: str | None = None
    # A vision expert's text twin (its HF names, same transform and shapes): what a source without the
    # expert's own tensors gives it.
    copies: tuple[str, ...] = ()

    def applies(self, shapes: "ConversionShapes | None") -> bool:
        return self.when is None or bool(getattr(shapes if shapes is not None else _MISTRAL_SWITCHES, self.when))

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron

    def bind(self, layer: int | None) -> "BoundMapping":
        if self.per_layer != (layer is not None):
            raise ValueError(f"{self.megatron}: layer index {layer!r}")
        fmt = (lambda n: n.format(i=layer)) if self.per_layer else (lambda n: n)
        return BoundMapping(self, fmt(self.megatron), tuple(fmt(n) for n in self.hf),
                            tuple(fmt(n) for n in self.copies))


@dataclass(frozen=True)
class BoundMapping:
    """A table row for one concrete layer."""

    rule: Mapping
    megatron: str
    hf: tuple[str, ...]
    copies: tuple[str, ...] = ()

    def source_names(self, available) -> tuple[str, ...]:
        """The HF tensors this row is read from in a source holding ``available`` names: its own, or,
        for a vision expert the source lacks, its text twin's."""
        if self.copies and not all(n in available for n in self.hf):
            return self.copies
        return self.hf

    def read_to_megatron(self, ckpt, shapes: ConversionShapes) -> torch.Tensor:
        """The Megatron tensor of this row read from ``ckpt`` (an HF checkpoint read tensor by tensor:
        ``header``, ``get``, ``read_rows``, ``torch_dtype_of``), from :meth:`source_names`; through the
        transform's reading form when it has one (one copy of the matrix in memory, not two)."""
        names, transform = self.source_names(ckpt.header), self.rule.transform
        dtypes = {ckpt.torch_dtype_of(n) for n in names}
        if transform.read_to_megatron is not None and len(dtypes) == 1:  # (a source of mixed dtypes: as cat would)
            return transform.read_to_megatron(lambda i, out: ckpt.read_rows(names[i], out),
                                              tuple(tuple(ckpt.header[n][1]) for n in names), dtypes.pop(), shapes)
        return transform.to_megatron(tuple(ckpt.get(n) for n in names), shapes)

    def to_hf(self, tensor: torch.Tensor, shapes: ConversionShapes) -> dict[str, torch.Tensor]:
        out = self.rule.transform.to_hf(tensor, shapes)
        return dict(zip(self.hf, out, strict=True))

    def to_megatron(self, tensors: dict[str, torch.Tensor], shapes: ConversionShapes) -> torch.Tensor:
        return self.rule.transform.to_megatron(tuple(tensors[n] for n in self.hf), shapes)

    def megatron_shape(self, shapes: ConversionShapes) -> tuple[int, ...]:
        return tuple(self.rule.megatron_shape(shapes))

    def hf_shapes(self, shapes: ConversionShapes) -> dict[str, tuple[int, ...]]:
        return {n: tuple(sh) for n, sh in zip(self.hf, self.rule.hf_shapes(shapes), strict=True)}


def _qkv_rows(s):
    return (s.num_attention_heads + 2 * s.num_query_groups) * s.head_dim


def _bias_shapes(s):
    return ((s.num_attention_heads * s.head_dim,), (s.num_query_groups * s.head_dim,),
            (s.num_query_groups * s.head_dim,))


L = "decoder.layers.{i}."
H = "model.layers.{i}."

#: THE table. Order = the order tensors are written to HF shards (Hugging Face's usual order).
MAPPINGS: tuple[Mapping, ...] = (
    Mapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB_PAD,
            lambda s: (s.padded_vocab_size, s.hidden_size), lambda s: ((s.hf_rows, s.hidden_size),)),
    Mapping("vision_patch_embed.weight", ("model.embed_vision_patch.weight",), IDENTITY,
            lambda s: (s.hidden_size, PATCH_DIM), lambda s: ((s.hidden_size, PATCH_DIM),), solo_only=True),
    Mapping(L + "input_layernorm.weight", (H + "input_layernorm.weight",), IDENTITY,
            lambda s: (s.hidden_size,), lambda s: ((s.hidden_size,),)),
    Mapping(L + "self_attention.linear_qkv.weight",
            (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"), QKV_GQA,
            lambda s: (_qkv_rows(s), s.hidden_size),
            lambda s: ((s.num_attention_heads * s.head_dim, s.hidden_size),
                       (s.num_query_groups * s.head_dim, s.hidden_size),
                       (s.num_query_groups * s.head_dim, s.hidden_size))),
    Mapping(L + "self_attention.linear_qkv.bias",
            (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"), QKV_GQA,
            lambda s: (_qkv_rows(s),), _bias_shapes, when="qkv_bias"),
    Mapping(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), IDENTITY,
            lambda s: (s.head_dim,), lambda s: ((s.head_dim,),), when="qk_layernorm"),
    Mapping(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), IDENTITY,
            lambda s: (s.head_dim,), lambda s: ((s.head_dim,),), when="qk_layernorm"),
    Mapping(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), IDENTITY,
            lambda s: (s.hidden_size, s.num_attention_heads * s.head_dim),
            lambda s: ((s.hidden_size, s.num_attention_heads * s.head_dim),)),
    Mapping(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",), IDENTITY,
            lambda s: (s.hidden_size,), lambda s: ((s.hidden_size,),)),
    Mapping(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), GATED_MLP,
            lambda s: (2 * s.ffn_hidden_size, s.hidden_size),
            lambda s: ((s.ffn_hidden_size, s.hidden_size), (s.ffn_hidden_size, s.hidden_size))),
    Mapping(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), IDENTITY,
            lambda s: (s.hidden_size, s.ffn_hidden_size), lambda s: ((s.hidden_size, s.ffn_hidden_size),)),
    # Vision experts (docs/MODEL.md): the image tokens' own weights, each a copy of its text twin at import.
    Mapping(L + "vision_input_layernorm.weight", (H + "vision_input_layernorm.weight",), IDENTITY,
            lambda s: (s.hidden_size,), lambda s: ((s.hidden_size,),), when="full_experts",
            copies=(H + "input_layernorm.weight",)),
    Mapping(L + "self_attention.vision_linear_qkv.weight",
            (H + "self_attn.vision_q_proj.weight", H + "self_attn.vision_k_proj.weight",
             H + "self_attn.vision_v_proj.weight"), QKV_GQA,
            lambda s: (_qkv_rows(s), s.hidden_size),
            lambda s: ((s.num_attention_heads * s.head_dim, s.hidden_size),
                       (s.num_query_groups * s.head_dim, s.hidden_size),
                       (s.num_query_groups * s.head_dim, s.hidden_size)), when="full_experts",
            copies=(H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight")),
    Mapping(L + "self_attention.vision_linear_qkv.bias",
            (H + "self_attn.vision_q_proj.bias", H + "self_attn.vision_k_proj.bias",
             H + "self_attn.vision_v_proj.bias"), QKV_GQA,
            lambda s: (_qkv_rows(s),), _bias_shapes, when="full_experts_qkv_bias",
            copies=(H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias")),
    Mapping(L + "self_attention.vision_linear_proj.weight", (H + "self_attn.vision_o_proj.weight",), IDENTITY,
            lambda s: (s.hidden_size, s.num_attention_heads * s.head_dim),
            lambda s: ((s.hidden_size, s.num_attention_heads * s.head_dim),), when="full_experts",
            copies=(H + "self_attn.o_proj.weight",)),
    Mapping(L + "vision_pre_mlp_layernorm.weight", (H + "vision_post_attention_layernorm.weight",), IDENTITY,
            lambda s: (s.hidden_size,), lambda s: ((s.hidden_size,),), when="ffn_experts",
            copies=(H + "post_attention_layernorm.weight",)),
    Mapping(L + "vision_mlp.linear_fc1.weight", (H + "vision_mlp.gate_proj.weight", H + "vision_mlp.up_proj.weight"),
            GATED_MLP, lambda s: (2 * s.ffn_hidden_size, s.hidden_size),
            lambda s: ((s.ffn_hidden_size, s.hidden_size), (s.ffn_hidden_size, s.hidden_size)), when="ffn_experts",
            copies=(H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight")),
    Mapping(L + "vision_mlp.linear_fc2.weight", (H + "vision_mlp.down_proj.weight",), IDENTITY,
            lambda s: (s.hidden_size, s.ffn_hidden_size), lambda s: ((s.hidden_size, s.ffn_hidden_size),),
            when="ffn_experts", copies=(H + "mlp.down_proj.weight",)),
    Mapping("decoder.final_layernorm.weight", ("model.norm.weight",), IDENTITY,
            lambda s: (s.hidden_size,), lambda s: ((s.hidden_size,),)),
    # Tied bases (Llama-3.2-1B/3B, small Qwens) store no lm_head, and megatron-core's model has no
    # output_layer.weight at PP=1 (the last stage's copy is kept equal to the embedding by megatron-core).
    Mapping("output_layer.weight", ("lm_head.weight",), VOCAB_PAD,
            lambda s: (s.padded_vocab_size, s.hidden_size), lambda s: ((s.hf_rows, s.hidden_size),),
            when="untied"),
)

# The switches of Mistral's architecture (what a bare number of layers stands for).
_MISTRAL_SWITCHES = ConversionShapes(1, 1, 1, 1, 1, 1, 1, 1)

# The TransformerEngine layer spec fuses the norms into the following linear layer. Its names are
# aliases of the local spec's, which is what the table uses.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def canonical_megatron_name(name: str) -> str:
    """Local-spec name for a Megatron parameter name (TE fused-norm names map to the local ones)."""
    for te, local in TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def bound_mappings(shapes: "ConversionShapes | int", *, include_solo_only: bool = True) -> list[BoundMapping]:
    """The table expanded for a model (its :class:`ConversionShapes`, or just a number of layers for
    Mistral's architecture), in HF shard order (embeddings, then layer 0's tensors, layer 1's, ...,
    then the final norm and the output layer); rows whose switch is off are left out."""
    if isinstance(shapes, int):
        num_layers, shapes = shapes, None
    else:
        num_layers = shapes.num_layers
    rules = [m for m in MAPPINGS if m.applies(shapes)]
    layer_rules = [m for m in rules if m.per_layer]
    out: list[BoundMapping] = []
    for m in rules:
        if m.solo_only and not include_solo_only:
            continue
        if not m.per_layer:
            out.append(m.bind(None))
        elif m is layer_rules[0]:
            out.extend(r.bind(i) for i in range(num_layers) for r in layer_rules)
    return out


def expected_hf_shapes(shapes: ConversionShapes, *, include_solo_only: bool = True) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for b in bound_mappings(shapes, include_solo_only=include_solo_only):
        out.update(b.hf_shapes(shapes))
    return out


def expected_megatron_shapes(shapes: ConversionShapes) -> dict[str, tuple[int, ...]]:
    return {b.megatron: b.megatron_shape(shapes) for b in bound_mappings(shapes)}


def patch_embed_init_std(embed_tokens: "torch.Tensor | Iterable[torch.Tensor]") -> float:
    """Std of the new patch embedding when starting from a text-only model.

    Normalised patches have roughly unit variance per value, so a ``N(0, sigma^2)`` weight gives each
    output value a std of about ``sigma * sqrt(3072)``. We choose ``sigma`` so that this equals the std
    of the base model's token embeddings: a patch then enters the residual stream at the same scale
    as a token does, added to the ``<vpatch>`` row.

    ``embed_tokens``: the matrix, or its rows in blocks (read from the file one at a time). One pass in
    float64 (sum and sum of squares; unbiased, as torch.std): embedding values are centred near zero, so
    the float64 difference loses nothing a bf16 or fp32 weight could show, and no whole-matrix copy is made.
    """
    blocks = _float64_row_chunks(embed_tokens) if isinstance(embed_tokens, torch.Tensor) else \
        (b.to(torch.float64) for b in embed_tokens)
    n, total, squares = 0, 0.0, 0.0
    for rows in blocks:
        flat = rows.reshape(-1)
        n, total, squares = n + flat.numel(), total + float(flat.sum()), squares + float(torch.dot(flat, flat))
    var = (squares - total * total / n) / (n - 1)
    return math.sqrt(var) / math.sqrt(PATCH_DIM)
