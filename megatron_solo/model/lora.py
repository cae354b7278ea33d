"""LoRA adapters (Hu et al. 2021) on megatron-core's parallel linear layers and SOLO's patch embedding.

``--lora-rank R --lora-alpha A --lora-dropout P --lora-targets ...`` (docs/TRAINING.md "LoRA"): each
targeted linear ``y = W x`` becomes ``y = W x + (A/R) * B (A_lora dropout(x))`` with ``A_lora`` [R, in]
and ``B`` [out, R]; only the adapters train (``training/param_groups.py``), ``W`` stays as loaded.

A variant is a different layer *spec*, never an ``if`` in ``forward``: :func:`lora_layer_submodules`
swaps the local spec's linear classes for the LoRA subclasses below (the vision experts' twins are built
from the same submodules, so they get adapters too), and :func:`patch_embedding_class` the patch
embedding's. The parameters are named ``<layer>.lora_a`` and ``<layer>.lora_b`` next to the layer's own
``weight``, so every base tensor keeps its checkpoint key and table row (``convert/mapping.py``).

Split over tensor parallelism like the layer they adapt (each adapter's output adds to its layer's):

* **column-parallel** (``linear_qkv``, ``linear_fc1``): ``lora_a`` is replicated, ``lora_b`` split like
  the layer's output rows. ``h = lora_a x`` is computed on the rank's input (the whole sequence; under
  sequence parallelism the rank's slice, then all-gathered: only R values per token travel), then
  ``lora_b`` gives this rank's output rows. Backward: the partial ``dh`` of each rank's rows is summed
  over TP (all-reduce; under SP reduce-scatter), so ``lora_a``'s gradient and the input gradient are the
  whole ones. Under SP each rank's ``lora_a`` gradient covers its sequence slice: marked
  ``sequence_parallel``, megatron-core's ``finalize_model_grads`` sums it over TP, as for the norms.
* **row-parallel** (``linear_proj``, ``linear_fc2``): ``lora_a`` split like the input columns,
  ``lora_b`` replicated. ``h = lora_a_r x_r`` is summed over TP (all-reduce; under SP reduce-scatter to
  the sequence slice, as the base layer does with its output), then ``lora_b``. Under SP ``lora_b``'s
  gradient covers the slice: marked ``sequence_parallel``.
* the **patch embedding** is replicated on every TP rank (``model/vision.py``): both adapters are too.

Initialisation (PEFT's): ``lora_b`` zero (the adapted model starts as the base), ``lora_a`` uniform in
``+-1/sqrt(in)``, drawn for the whole matrix from a generator seeded by the run's seed and the tensor's
*global* name, then sliced for the rank: every TP/PP/VPP layout starts from the same adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_solo.model.vision import VisionPatchEmbedding
from megatron_solo.parameter_names import (  # noqa: F401  (the names' one definition, torch-free)
    DEFAULT_LORA_TARGETS,
    LORA_PARAMS,
    LORA_TARGETS,
    adapted_weight_name,
    is_lora_parameter,
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The run's adapters: decided once (``training/config.py``), recorded in every checkpoint."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    seed: int = 1234

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: choose from {', '.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def record(self) -> dict:
        """What a checkpoint stores (the seed only starts adapters, a resume loads them)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_record(cls, d: dict) -> "LoraConfig":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                   targets=tuple(d["targets"]))


def _adapter_parameter(weight: torch.Tensor, rows: int, cols: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(rows, cols, dtype=weight.dtype, device=weight.device))


class _TrackedDropout(torch.nn.Dropout):
    """Dropout drawn from megatron-core's model-parallel RNG stream: each TP rank's own, for an input split
    over TP (as megatron-core's attention dropout is)."""

    def forward(self, x):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return super().forward(x)


class _Adapter:
    """The adapter's pieces shared by the layer classes: scale, dropout, parameters, the added product."""

    def _add_adapter(self, lora: LoraConfig, in_features: int, out_features: int, split_input: bool = False) -> None:
        self.lora_scale = lora.scale
        dropout = _TrackedDropout if split_input else torch.nn.Dropout
        self.lora_dropout = dropout(lora.dropout) if lora.dropout > 0 else torch.nn.Identity()
        self.lora_a = _adapter_parameter(self.weight, lora.rank, in_features)
        self.lora_b = _adapter_parameter(self.weight, out_features, lora.rank)

    def _plus_adapter(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``out + scale * h lora_b^T`` as one addmm (no separate scaling and addition of an output-sized
        tensor: on a CPU those cost more than the adapter's own matmuls)."""
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_b.t(),
                           alpha=self.lora_scale)
        return flat.view(out.shape)


class LoraColumnParallelLinear(_Adapter, ColumnParallelLinear):
    """``ColumnParallelLinear`` + adapter: ``lora_a`` replicated, ``lora_b`` split like the output."""

    def __init__(self, input_size, output_size, *, lora: LoraConfig, stacked_halves: bool = False, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        # linear_fc1 of a gated MLP: each rank's rows are [gate_r; up_r], the checkpoint's [gate; up]
        # (megatron-core's MLP re-shards its weight so): lora_b's rows follow the output's, so they too.
        self.stacked_halves = stacked_halves and bool(self.config.gated_linear_unit)
        if self.gather_output or self.explicit_expert_comm:
            raise ValueError("LoRA adapts column-parallel layers whose output stays split (no gather_output, "
                             "no expert parallelism)")
        self._add_adapter(lora, self.input_size, self.output_size_per_partition)
        set_tensor_model_parallel_attributes(self.lora_b, is_parallel=True, dim=0, stride=1)
        # Under SP each rank's lora_a gradient covers its sequence slice: summed over TP by finalize_model_grads.
        setattr(self.lora_a, "sequence_parallel", bool(self.sequence_parallel))

    def forward(self, input_, weight=None, runtime_gather_output=None):
        out, bias = super().forward(input_, weight, runtime_gather_output)
        h = torch.nn.functional.linear(self.lora_dropout(input_), self.lora_a)
        if self.sequence_parallel:  # slice -> whole sequence (backward: reduce-scatter of the partial dh)
            h = tensor_parallel.gather_from_sequence_parallel_region(h, group=self.tp_group)
        else:  # identity (backward: all-reduce of the partial dh)
            h = tensor_parallel.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        return self._plus_adapter(out, h), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0, "bias": 0, "lora_b": 0},
            sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        if self.stacked_halves:  # as MLP.sharded_state_dict does for the weight (it matches weight/bias only)
            key = f"{prefix}lora_b"
            sd[key] = apply_swiglu_sharded_factory(
                sd[key], sharded_offsets, metadata.get("singleton_local_shards", False), tp_group=self.tp_group,
                dp_group=metadata["dp_cp_group"])
        return sd


class LoraRowParallelLinear(_Adapter, RowParallelLinear):
    """``RowParallelLinear`` + adapter: ``lora_a`` split like the input, ``lora_b`` replicated."""

    def __init__(self, input_size, output_size, *, lora: LoraConfig, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        if not self.input_is_parallel or self.explicit_expert_comm:
            raise ValueError("LoRA adapts row-parallel layers whose input is already split (no expert parallelism)")
        # The input is split over TP like lora_a's columns: a rank's dropout mask from its own stream.
        self._add_adapter(lora, self.input_size_per_partition, self.output_size, split_input=True)
        set_tensor_model_parallel_attributes(self.lora_a, is_parallel=True, dim=1, stride=1)
        setattr(self.lora_b, "sequence_parallel", bool(self.sequence_parallel))

    def forward(self, input_):
        out, bias = super().forward(input_)
        h = torch.nn.functional.linear(self.lora_dropout(input_), self.lora_a)
        if self.sequence_parallel:  # summed over TP, this rank's sequence slice (as the base layer's output)
            h = tensor_parallel.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        else:
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return self._plus_adapter(out, h), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 1, "lora_a": 1},
            sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


class LoraVisionPatchEmbedding(_Adapter, VisionPatchEmbedding):
    """The patch embedding + adapter (both replicated, as the embedding is)."""

    def __init__(self, config, *, lora: LoraConfig, **kwargs):
        super().__init__(config, **kwargs)
        self._add_adapter(lora, self.weight.shape[1], self.weight.shape[0])

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.normalized(patches)
        h = torch.nn.functional.linear(self.lora_dropout(x), self.lora_a)
        return self._plus_adapter(torch.nn.functional.linear(x, self.weight), h)


# ------------------------------------------------------------------------------------------------ specs
def lora_layer_submodules(sub, lora: LoraConfig):
    """The local spec's ``TransformerLayerSubmodules`` with the targeted linears swapped for their LoRA
    classes (``sub`` is changed and returned). Only megatron-core's own Column/RowParallelLinear are
    adapted; Transformer Engine's fused norm+linear layers are refused by the caller."""
    attn, mlp = sub.self_attention.submodules, sub.mlp.keywords["submodules"]
    for owner, field, cls, extra in ((attn, "linear_qkv", LoraColumnParallelLinear, {}),
                                     (attn, "linear_proj", LoraRowParallelLinear, {}),
                                     (mlp, "linear_fc1", LoraColumnParallelLinear, {"stacked_halves": True}),
                                     (mlp, "linear_fc2", LoraRowParallelLinear, {})):
        if field not in lora.targets:
            continue
        base = getattr(owner, field)
        if base not in (ColumnParallelLinear, RowParallelLinear) or not issubclass(cls, base):
            raise ValueError(f"LoRA adapts megatron-core's ColumnParallelLinear/RowParallelLinear; the spec's "
                             f"{field} is {getattr(base, '__name__', base)}")
        setattr(owner, field, functools.partial(cls, lora=lora, **extra))
    return sub


def patch_embedding_class(lora: LoraConfig | None):
    """The patch embedding's module: with an adapter when ``vision_patch_embed`` is a target."""
    if lora is None or "vision_patch_embed" not in lora.targets:
        return VisionPatchEmbedding
    return functools.partial(LoraVisionPatchEmbedding, lora=lora)


# ------------------------------------------------------------------------------------------------ init
def _global_adapter_modules(model):
    """(global name, module) of every adapted module of a ``SoloModel`` chunk: layers by their global
    number (``layer_number`` is 1-based and global under PP/VPP)."""
    if getattr(model, "vision_patch_embed", None) is not None and hasattr(model.vision_patch_embed, "lora_a"):
        yield "vision_patch_embed", model.vision_patch_embed
    for layer in model.decoder.layers:
        for name, module in layer.named_modules():
            if isinstance(module, _Adapter) and name:
                yield f"decoder.layers.{layer.layer_number - 1}.{name}", module


def init_adapters(model, seed: int) -> int:
    """PEFT's start: ``lora_b`` zero, ``lora_a`` uniform in +-1/sqrt(in) (kaiming_uniform, a=sqrt(5)), the
    whole matrix drawn from a generator seeded by ``seed`` and the global name, sliced for this TP rank.
    Returns the number of adapted modules."""
    n = 0
    with torch.no_grad():
        for name, m in _global_adapter_modules(model):
            full_in = m.input_size if isinstance(m, RowParallelLinear) else m.lora_a.shape[1]
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            bound = 1.0 / math.sqrt(full_in)
            full = torch.rand(m.lora_a.shape[0], full_in, generator=g, dtype=torch.float32) * (2 * bound) - bound
            if isinstance(m, RowParallelLinear):
                part = m.lora_a.shape[1]
                rank = m.tp_group.rank() if m.tp_group is not None and m.tp_group.size() > 1 else 0
                full = full[:, rank * part:(rank + 1) * part]
            m.lora_a.copy_(full.to(m.lora_a.dtype))
            m.lora_b.zero_()
            n += 1
    return n
