"""megatron-core's ``torch_dist`` checkpoint format, written and read one tensor at a time.

Why not ``dist_checkpointing.save``/``load`` on a whole model: both hold more than the model.
megatron-core's writer (``FileSystemWriterAsync.prepare_write_data``) clones every tensor that is a
view into a larger storage before writing anything: ``linear_fc1``'s SwiGLU halves are such views
(its sharded factory splits ``[gate; up]``), so a save of a bf16 Mistral-7B stages another 7.5 GB.
And a load materialises the model's state dict, then ``load_state_dict`` copies it into the model.

What this module does instead, through public APIs only:

* **save** (:class:`StreamingSaveStrategy`): megatron-core's own ``dist_checkpointing.save`` runs with
  this sharded strategy. The model is built on the ``meta`` device, so its sharded state dict has
  every key, global shape, chunk offset, ``_extra_state`` object, the common state and RNG exactly
  as a real save; megatron-core's translation (``mcore_to_pyt_state_dict``) turns it into torch DCP's
  state dict, and ``torch.distributed.checkpoint.save`` writes it with torch's ``FileSystemWriter``
  (one file per rank, one thread: tensors are resolved and written one at a time) and a planner whose
  ``resolve_data`` asks a callback for each chunk's data at the moment it is written. Memory: one
  chunk (plus the producer's cache of one table row).
* **load** (:class:`CheckpointTensorReader`): ``torch.distributed.checkpoint.load`` of ONE parameter's
  region of its stored tensor (megatron-core's layout, found from the meta model's sharded state dict),
  whatever chunks the saving run's TP/PP wrote it in. (``dist_checkpointing.load`` of a single layer
  of a per-layer key fails in a world of one: megatron-core places the other layers' chunks on rank
  ``(rank + 1) % world_size``, which is this rank.)
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_solo.convert.full_model import build_meta_model
from megatron_solo.convert.mapping import canonical_megatron_name

#: produce(dict key of the parameter in the model's sharded state dict, offsets in the parameter, sizes)
#: -> the tensor of that chunk (the parameter's dtype)
ChunkProducer = Callable[[str, tuple[int, ...], tuple[int, ...]], torch.Tensor]


def _chunk_index(sharded_state_dict) -> dict[tuple[str, tuple[int, ...]], tuple[str, int]]:
    """(checkpoint key, global offset) of every ShardedTensor -> (the model's parameter name, number of
    prepended axes). The parameter name is the dict key under the top-level ``model`` entry."""
    out = {}

    def walk(obj, name):
        if isinstance(obj, ShardedTensor):
            out[(obj.key, tuple(obj.global_offset))] = (name, obj.prepend_axis_num)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, name)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, name)

    for top, sub in sharded_state_dict.items():
        if isinstance(sub, dict) and top.startswith("model"):
            for name, v in sub.items():
                walk(v, name)
    return out


class _LazyPlanner(MCoreSavePlanner):
    """megatron-core's save planner, except that a tensor chunk's data comes from ``produce`` when the
    writer asks for it (the state dict only describes it, on the meta device).

    Each chunk's memory is freed when the writer asks for the next one (and by :meth:`release` after the
    save): torch's ``FileSystemWriter`` keeps a reference to every tensor it wrote to a file until the file
    is closed (``tensor_dict``, used only for its safetensors format), and this writer has one file per
    rank, so without this the whole model would stay resident. Its serial loader asks for chunk ``i + 1``
    only once chunk ``i`` is written."""

    def __init__(self, produce, index, **kw):
        super().__init__(**kw)
        self._produce, self._index, self._written = produce, index, None

    def release(self):
        """Free the last chunk handed to the writer (its storage: the writer's references see 0 bytes)."""
        if self._written is not None:
            self._written.untyped_storage().resize_(0)
            self._written = None

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        self.release()
        chunk = write_item.tensor_data.chunk
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        name, prepend = self._index[(write_item.index.fqn, offsets)]
        t = self._produce(name, offsets[prepend:], sizes[prepend:])
        want = write_item.tensor_data.properties.dtype
        if t.dtype != want or tuple(t.shape) != sizes[prepend:]:
            raise RuntimeError(f"{name}: produced {t.dtype} {list(t.shape)}, the checkpoint wants {want} "
                               f"{list(sizes[prepend:])}")
        t = t.reshape(sizes)
        if t.untyped_storage().nbytes() != t.nbytes:
            # a part of a larger tensor (linear_fc1's halves, a TP shard): the copy the writer would make
            # anyway, made here so that it is ours to free
            t = t.clone()
        # Whole-storage tensors are a row's only chunk (RowCache): freeing it ends that row, and a later
        # read of the row would fail loudly (0-byte storage), never return stale data.
        self._written = t
        return t


@contextlib.contextmanager
def _no_crc32():
    """``torch.save`` without the CRC32 of each record, restored after: it costs a pass over every byte
    written (about a third of the conversion's write time at 7B), and ``torch.load`` does not check it
    (PyTorch builds miniz with its reader's CRC checks off)."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's torch_dist format, each tensor chunk produced when it is written.

    Pass as ``sharded_strategy`` to ``dist_checkpointing.save`` (via
    :func:`megatron_solo.checkpoint.save_checkpoint`) with a model built by :func:`build_meta_model`.
    """

    def __init__(self, produce: ChunkProducer):
        super().__init__("torch_dist", 1)
        self.produce = produce

    def save(self, sharded_state_dict, checkpoint_dir):
        index = _chunk_index(sharded_state_dict)
        sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sd, False)
        planner = _LazyPlanner(self.produce, index, dedup_replicated_tensors=False, flatten_state_dict=False,
                               flatten_sharded_tensors=False)
        # One thread, one file per rank: the writer resolves, writes and drops one chunk at a time.
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1, sync_files=True)
        with _no_crc32():
            dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)
        planner.release()

    def async_save(self, *a, **k):  # pragma: no cover - the conversion saves synchronously
        raise NotImplementedError("StreamingSaveStrategy saves synchronously")


class RowCache:
    """The full Megatron tensor of the last table row asked for: a parameter split into several chunks
    (``linear_fc1``'s halves, TP shards) is converted once."""

    def __init__(self, make: Callable[[str], torch.Tensor]):
        self._make, self._name, self._tensor = make, None, None

    def chunk(self, name: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        if name != self._name:
            self._name, self._tensor = None, None  # drop the previous row before making the next
            self._tensor, self._name = self._make(name), name
        t = self._tensor
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            if o != 0 or s != t.shape[dim]:
                t = t.narrow(dim, o, s)
        return t


def _sharded_tensors(obj):
    if isinstance(obj, ShardedTensor):
        yield obj
    elif isinstance(obj, ShardedTensorFactory):
        yield from _sharded_tensors(obj.build())
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _sharded_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _sharded_tensors(v)


class _RegionLoadPlanner(DefaultLoadPlanner):
    """torch DCP's load planner for ONE region (offsets, sizes) of one stored tensor: read items for
    every stored chunk that overlaps it (torch's own ``create_read_items_for_chunk_list``), copied into
    ``target``. Any chunking of the stored tensor (any TP/PP of the saving run) reads the same."""

    def __init__(self, fqn: str, offsets, target: torch.Tensor):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._fqn, self._offsets, self._target = fqn, tuple(offsets), target

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self._fqn]
        chunk = ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=self._target.shape)
        return LoadPlan(create_read_items_for_chunk_list(self._fqn, md, [chunk]))

    def lookup_tensor(self, index):
        return self._target  # the default transform_tensor narrows it to each read item's destination


class CheckpointTensorReader:
    """One parameter at a time from a megatron_solo checkpoint saved at any TP/PP.

    Where each parameter lives (stored key, offset of its region, e.g. layer ``i`` of a per-layer key)
    comes from megatron-core itself: the sharded state dict of the TP=1 model built on the meta device.
    The region is read with torch DCP's public load API (no collectives: ``no_dist``), so memory holds
    one parameter. ``get(name)`` returns the full TP=1 tensor of the table's parameter ``name`` in the
    checkpoint's own dtype.
    """

    def __init__(self, info: dict, model_args, padded_vocab_size: int, lora=None):
        self.path = info["path"]
        metadata = FileSystemReader(self.path).read_metadata()
        self._dtypes = {k: v.properties.dtype for k, v in metadata.state_dict_metadata.items()
                        if hasattr(v, "properties")}
        self.dtype = self._dtypes["embedding.word_embeddings.weight"]
        self.model = build_meta_model(model_args, padded_vocab_size, self.dtype, lora=lora)  # lora: its adapters too
        params = dict(self.model.named_parameters())
        self._regions = {}
        for name, entry in self.model.sharded_state_dict().items():
            if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
                continue  # _extra_state objects
            chunks = list(_sharded_tensors(entry))
            offsets = tuple(min(c.global_offset[d] for c in chunks) for d in range(len(chunks[0].global_offset)))
            shape = tuple(params[name].shape)
            sizes = (1,) * chunks[0].prepend_axis_num + shape
            self._regions[canonical_megatron_name(name)] = (chunks[0].key, offsets, sizes, shape)

    def names(self) -> list[str]:
        return list(self._regions)

    def get(self, name: str) -> torch.Tensor:
        key, offsets, sizes, shape = self._regions[name]
        target = torch.empty(sizes, dtype=self._dtypes.get(key, self.dtype))
        dcp_load({key: target}, storage_reader=FileSystemReader(self.path),
                 planner=_RegionLoadPlanner(key, offsets, target), no_dist=True)
        return target.view(shape)
