"""SOLO's vision-patch embedding: one linear map 3072 -> hidden, added at ``<vpatch>`` positions.

Patches arrive as stored on disk: uint8 ``[n, 3072]``, each a channel-major (3, 32, 32) block of the
resized image. They are normalised here, in the model's input path, to exactly SOLO's values
``(x / 255 - mean) / std`` (ImageNet statistics, computed in fp32). Floating-point patches are taken
as *already normalised* (SOLO's own float16 data, the Hugging Face ``vision_patches`` input) and
used as they are.

Parallelism (see docs/MODEL.md):

* TP: the weight is **replicated** on every TP rank (a plain parameter, no ``tensor_model_parallel``
  attribute). It is small (3072 x hidden: 12.6M parameters at 7B, 0.2% of the model), and a replicated
  projection gives every rank the full-hidden result that the word embedding's all-reduce also gives,
  with no extra collective; a column-parallel split would save 3072 x hidden x (1 - 1/TP) values per
  rank and cost an all-gather of [n_patches, hidden] per micro-batch, forward and backward. The
  gradient that reaches the embedding output is identical on all TP ranks (every consumer of the
  decoder input is TP-replicated or sits behind megatron's copy-to-TP region), so the replicas stay
  equal without any reduction of their own; the optimizer counts them once in the grad norm.
* SP: the add happens on the full sequence, *before* the scatter to sequence-parallel regions (as
  megatron's embedding scatters after its all-reduce); the scatter's backward all-gathers, so each
  rank again holds the whole gradient.
* PP: built on the first stage only (``pre_process``), like the word embedding.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_solo.spec import PATCH_DIM, SOLO_IDS, normalize_patches


class VisionPatchEmbedding(MegatronModule):
    """``weight`` [hidden, 3072], no bias; ``forward`` adds ``W @ normalise(patch_k)`` at the k-th ``<vpatch>``."""

    def __init__(self, config, patch_dim: int = PATCH_DIM, vision_patch_id: int = SOLO_IDS.vision_patch):
        super().__init__(config=config)
        self.vision_patch_id = vision_patch_id
        self.weight = torch.nn.Parameter(
            torch.empty(config.hidden_size, patch_dim, dtype=config.params_dtype,
                        device="cpu" if config.use_cpu_initialization else torch.cuda.current_device())
        )
        if config.perform_initialization:
            # The default generator: the same seed on every TP rank, so the replicas start equal.
            with torch.no_grad():
                config.init_method(self.weight)

    def normalized(self, patches: torch.Tensor) -> torch.Tensor:
        """``[n, 3072]`` patches as the projection takes them (normalised, the weight's dtype and device)."""
        if patches.dim() != 2:
            raise ValueError(f"patches must be [n, {PATCH_DIM}], got {tuple(patches.shape)}")
        return normalize_patches(patches.to(self.weight.device), dtype=self.weight.dtype)

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """``[n, 3072]`` patches -> ``[n, hidden]``."""
        return torch.nn.functional.linear(self.normalized(patches), self.weight)

    def forward(self, embeddings: torch.Tensor, input_ids: torch.Tensor, patches: torch.Tensor | None):
        """``embeddings`` [s, b, h] (megatron's layout, full sequence); ``input_ids`` [b, s].

        The k-th ``<vpatch>`` of ``input_ids`` in row-major [b, s] order takes ``patches[k]``.
        """
        is_patch = input_ids == self.vision_patch_id
        b_idx, s_idx = is_patch.nonzero(as_tuple=True)  # row-major order of [b, s]
        n = b_idx.numel()
        n_given = 0 if patches is None else patches.size(0)
        if n != n_given:
            raise ValueError(
                f"the batch has {n} <vpatch> tokens (id {self.vision_patch_id}) but {n_given} image patches; "
                "the k-th <vpatch> in row-major [b, s] order must take patches[k]"
            )
        if n == 0:
            # Keep the weight in the graph (zero gradient) so that gradient hooks that wait for
            # every parameter (DDP with overlapped grad reduction) fire on text-only batches too.
            return embeddings + 0.0 * self.weight[0, 0].to(embeddings.dtype)
        vis = self.project(patches).to(embeddings.dtype)
        return embeddings.index_put((s_idx, b_idx), vis, accumulate=True)
