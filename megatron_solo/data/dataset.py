"""Training datasets over SOLO prefixes: a megatron-core ``MegatronDataset``, collate, and blends.

One sample is one pack of a prefix (see :mod:`megatron_solo.data.indexed`), cut or padded to
``seq_length`` input tokens. :meth:`SoloDataset.__getitem__` returns, unbatched (torch tensors)::

    tokens         int64 [s]      input ids, padding 0
    labels         int64 [s]      next token of the same document, 0 where invalid
    loss_mask      float32 [s]    roles.label_loss_mask (trained role configurable)
    position_ids   int64 [s]      restart at 0 for each document (and for the padding)
    doc_lengths    int32 [d]      document lengths in this sample (+ one for trailing padding), sum s
    image_doc_mask bool [s]       token's document (as it appears in the sample) holds an image token
    patches        uint8 [n, 3072] the patches of the sample's <vpatch> tokens, in order
    patch_coords   int64 [n, 2]   each patch's (row, col) inside its image, aligned with patches

:func:`collate` makes a micro-batch with the keys/dtypes/shapes of docs/ARCHITECTURE.md.

The order of samples is a seeded permutation of the split's packs per epoch, recomputed in memory
on every rank (no cache files: nothing to race on); several epochs are concatenated when more
samples are requested than the split holds. Blends use megatron-core's BlendedDataset.
"""

from __future__ import annotations

import logging
import math
import shlex
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split, get_blend_from_list

from megatron_solo.data.indexed import SoloIndexedDataset
from megatron_solo.data.stats import blend_chat_template, blend_row_separator
from megatron_solo.data.roles import trained_roles
from megatron_solo.data.sample import sample_arrays
from megatron_solo.data.splits import DataSplitError, check_split_packs, empty_split_message
from megatron_solo.spec import MISTRAL_VOCAB, PATCH_DIM, SoloVocab

logger = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "doc_lengths", "image_doc_mask", "patches",
              "patch_coords")


@dataclass
class SoloDatasetConfig(BlendedMegatronDatasetConfig):
    """megatron-core's config plus the trained role (``--loss-role``)."""

    loss_role: str = "assistant"

    def __post_init__(self) -> None:
        super().__post_init__()
        trained_roles(self.loss_role)  # validates


def build_sample(segments, seq_length: int, loss_role: str = "assistant", vocab: SoloVocab = MISTRAL_VOCAB) -> dict:
    """:func:`~megatron_solo.data.sample.sample_arrays` as torch tensors (the fields of this module's docstring)."""
    return {k: torch.from_numpy(v) for k, v in sample_arrays(segments, seq_length, loss_role, vocab).items()}


def collate(samples: Sequence[dict]) -> dict:
    """Samples -> one micro-batch (docs/ARCHITECTURE.md). Extra keys (BlendedDataset's
    ``dataset_id``) are dropped; ``doc_lengths`` rows are zero-padded on the right."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch = {k: torch.stack([torch.as_tensor(x[k]) for x in samples]) for k in
             ("tokens", "labels", "loss_mask", "position_ids", "image_doc_mask")}
    batch["tokens"] = batch["tokens"].long()
    batch["labels"] = batch["labels"].long()
    batch["position_ids"] = batch["position_ids"].long()
    batch["loss_mask"] = batch["loss_mask"].float()
    batch["image_doc_mask"] = batch["image_doc_mask"].bool()
    d = max(len(x["doc_lengths"]) for x in samples)
    doc_lengths = torch.zeros(len(samples), d, dtype=torch.int32)
    for i, x in enumerate(samples):
        dl = torch.as_tensor(x["doc_lengths"], dtype=torch.int32)
        doc_lengths[i, : len(dl)] = dl
    batch["doc_lengths"] = doc_lengths
    patches = [torch.as_tensor(x["patches"], dtype=torch.uint8).reshape(-1, PATCH_DIM) for x in samples]
    batch["patches"] = torch.cat(patches, 0) if patches else torch.zeros(0, PATCH_DIM, dtype=torch.uint8)
    if all("patch_coords" in x for x in samples):  # every sample of a SoloDataset has them
        coords = [torch.as_tensor(x["patch_coords"], dtype=torch.int64).reshape(-1, 2) for x in samples]
        batch["patch_coords"] = torch.cat(coords, 0)
    return batch


class SoloDataset(MegatronDataset):
    """A megatron-core MegatronDataset over one SOLO prefix: one sample per pack (see module doc)."""

    def __init__(self, dataset: SoloIndexedDataset, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: SoloDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.loss_role = getattr(config, "loss_role", "assistant")
        self.sample_index = self._build_sample_index()

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: SoloIndexedDataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: BlendedMegatronDatasetConfig) -> SoloIndexedDataset:
        return SoloIndexedDataset(dataset_path, mmap=config.mmap_bin_files)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return ["random_seed", "sequence_length", "split", "split_matrix", "loss_role"]

    def _build_sample_index(self) -> np.ndarray:
        indices = np.asarray(self.indices, dtype=np.int64)
        n = len(indices)
        want = n if self.num_samples is None else int(self.num_samples)
        if want == 0:
            return np.zeros(0, np.int64)
        if n == 0:
            raise DataSplitError(empty_split_message(self.dataset_path, self.index_split.name,
                                                     getattr(self.config, "split", None), len(self.dataset), want))
        epochs = math.ceil(want / n)
        out = []
        for epoch in range(epochs):
            rng = np.random.Generator(np.random.PCG64([int(self.config.random_seed), self.index_split.value, epoch]))
            out.append(rng.permutation(indices))
        return np.concatenate(out)[:want]

    def __len__(self) -> int:
        return len(self.sample_index)

    def __getitem__(self, idx: int) -> dict:
        pack = int(self.sample_index[idx])
        segments = self.dataset.pack(pack, max_tokens=self.config.sequence_length + 1, with_coords=True)
        return build_sample(segments, self.config.sequence_length, self.loss_role, self.dataset.vocab)


def check_split_sizes(data_path, split: str, train_samples: int = 1, valid_samples: int = 0) -> None:
    """Raise :class:`DataSplitError` when a split the run reads holds no packs of some prefix of ``data_path``
    (:func:`megatron_solo.data.splits.check_split_packs`)."""
    check_split_packs(parse_data_path(data_path)[0], split, train_samples, valid_samples)


def parse_data_path(data_path) -> Optional[tuple[list[str], Optional[list[float]]]]:
    """Megatron's ``--data-path`` syntax: ``"P"``, ``"P1 P2"`` or ``"w1 P1 w2 P2"`` (or a list of those
    words) -> megatron-core's blend ``(prefixes, weights or None)``."""
    if data_path is None:
        return None
    words = shlex.split(data_path) if isinstance(data_path, str) else [w for x in data_path for w in shlex.split(str(x))]
    if not words:
        return None
    from megatron_solo.data.shards import expand_blend  # a shard set (X.shards or a glob) is one source

    return expand_blend(get_blend_from_list(words))


def data_row_separator(*data_paths) -> bool:
    """The image layout (``--row-separator``) of every prefix of the given ``--data-path``-style blends, read
    by one model (:func:`~megatron_solo.data.stats.blend_row_separator`: a mixed one is refused, one line)."""
    prefixes = [p for d in data_paths if d for p in (parse_data_path(d) or ([], None))[0]]
    return blend_row_separator(dict.fromkeys(prefixes), "the run's data (--data-path, --valid-data-path)")


def data_chat_template(*data_paths) -> str | None:
    """The chat template of the given ``--data-path``-style blends' chat prefixes when they share one
    (:func:`~megatron_solo.data.stats.blend_chat_template`), else None."""
    return blend_chat_template(dict.fromkeys(p for d in data_paths if d for p in (parse_data_path(d) or ([], None))[0]))


def build_train_valid_test_datasets(
    data_path,
    split: str = "969,30,1",
    seq_length: int = 4096,
    train_samples: Optional[int] = None,
    valid_samples: Optional[int] = None,
    test_samples: Optional[int] = None,
    seed: int = 1234,
    loss_role: str = "assistant",
    tokenizer=None,
    valid_data_path=None,
    test_data_path=None,
    path_to_cache: Optional[str] = None,
    mmap: bool = True,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    mid_level_dataset_surplus: float = 0.005,
):
    """Build (train, valid, test) datasets with megatron-core's BlendedMegatronDatasetBuilder.

    ``data_path`` uses Megatron's ``--data-path`` syntax and is split by ``split`` ("969,30,1").
    With ``valid_data_path`` (and optionally ``test_data_path``), the train blend is ``data_path``
    whole and the other splits come from their own blends (``split`` is then ignored). Must be
    called on every rank when torch.distributed is initialised (megatron builds on rank 0 first,
    then the others). ``tokenizer`` is accepted for symmetry and unused: the data are pre-tokenized.
    """
    del tokenizer
    blend = parse_data_path(data_path)
    if blend is None:
        raise ValueError("data_path is empty")
    data_row_separator(data_path, valid_data_path, test_data_path)  # one image layout for the one model
    kwargs = dict(random_seed=seed, sequence_length=seq_length, path_to_cache=path_to_cache,
                  mmap_bin_files=mmap, loss_role=loss_role, mid_level_dataset_surplus=mid_level_dataset_surplus)
    if valid_data_path is not None or test_data_path is not None:
        config = SoloDatasetConfig(blend_per_split=[blend, parse_data_path(valid_data_path),
                                                    parse_data_path(test_data_path)], **kwargs)
    else:
        config = SoloDatasetConfig(blend=blend, split=split, **kwargs)
    builder = BlendedMegatronDatasetBuilder(
        SoloDataset, [train_samples, valid_samples, test_samples], is_built_on_rank or (lambda: True), config)
    return tuple(builder.build())
