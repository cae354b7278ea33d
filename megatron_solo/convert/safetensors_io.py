"""safetensors shards without the ``safetensors`` package: read a HF checkpoint one tensor at a time
(:class:`HFCheckpoint`), write an export one tensor at a time (:class:`StreamingSafetensorsWriter`).

Memory holds one tensor, never a shard: reads are positioned reads (no memory map), and every shard's
header is laid out before any data is written.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from megatron_solo.convert.errors import ConversionError

_IGNORED_KEYS_SUFFIX = ("rotary_emb.inv_freq",)  # buffers some old exports carry


class HFCheckpoint:
    """The safetensors tensors of a HF checkpoint directory, read one at a time (positioned reads).

    Nothing is read but headers until :meth:`get`: opening checks the index, that each shard exists and
    has a valid safetensors header whose data fits in the file, and that the index agrees with the
    shards; :meth:`check` then checks that every expected tensor is present with the expected shape
    (and no unexpected ones).
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
        elif os.path.isfile(single):
            weight_map = None
        else:
            bins = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {bins[:3]}: convert pickled checkpoints to safetensors first)" if bins else ""
            raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{hint}")
        self.header: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (dtype, shape)
        self.file_of: dict[str, str] = {}
        self.offset: dict[str, int] = {}  # absolute byte offset of each tensor's data in its file
        files = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.isfile(path):
                raise ConversionError(f"{path}: shard listed in the index is missing")
            for name, (dtype, shape, offset) in _read_safetensors_header(path).items():
                self.header[name] = (dtype, shape)
                self.offset[name] = offset
                self.file_of[name] = fname
        if weight_map is not None:
            for name, fname in weight_map.items():
                if self.file_of.get(name) != fname:
                    raise ConversionError(f"{os.path.join(hf_dir, fname)}: index lists {name} in it, the shard "
                                          "does not hold it (incomplete or mismatched shards)")

    def check(self, expected: dict[str, tuple[int, ...]], what: str) -> None:
        missing = [n for n in expected if n not in self.header]
        if missing:
            raise ConversionError(f"{self.hf_dir}: {len(missing)} tensors of a {what} are missing, e.g. "
                                  f"{missing[:3]}")
        bad = [(n, self.header[n][1], s) for n, s in expected.items() if tuple(self.header[n][1]) != tuple(s)]
        if bad:
            n, got, want = bad[0]
            raise ConversionError(f"{self.hf_dir}: {n} has shape {list(got)}, config.json implies {list(want)} "
                                  f"({len(bad)} tensors disagree with the config)")
        extra = [n for n in self.header if n not in expected and not n.endswith(_IGNORED_KEYS_SUFFIX)]
        if extra:
            raise ConversionError(f"{self.hf_dir}: unexpected tensors for a {what}: {extra[:3]} "
                                  f"({len(extra)} in all)")

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor with a plain positioned read: no memory map, so nothing but the returned
        tensor stays resident (a mapped shard's pages would count in the converter's RSS)."""
        return self._read_into(name, torch.empty(self.header[name][1], dtype=self.torch_dtype_of(name)), 0)

    def read_rows(self, name: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rows ``start .. start + len(out)`` (dim 0) of tensor ``name`` read into ``out`` (contiguous, the
        tensor's dtype and trailing shape), which is returned: a matrix is read where it is needed (into the
        padded embedding) or a block at a time (its statistics), never staged whole."""
        shape = self.header[name][1]
        if (out.dtype != self.torch_dtype_of(name) or out.dim() == 0 or tuple(out.shape[1:]) != tuple(shape[1:])
                or not out.is_contiguous() or not 0 <= start <= start + out.shape[0] <= shape[0]):
            raise ValueError(f"{name}: cannot read rows {start}..{start + len(out)} of {list(shape)} into "
                             f"{out.dtype} {list(out.shape)}")
        return self._read_into(name, out, start * math.prod(shape[1:]) * out.element_size())

    def row_blocks(self, name: str, rows: int | None = None, block: int = 4096):
        """Tensor ``name``'s first ``rows`` rows (default: all) in blocks of ``block`` rows, read one at a time."""
        shape = self.header[name][1]
        n = shape[0] if rows is None else rows
        for start in range(0, n, block):
            out = torch.empty((min(block, n - start), *shape[1:]), dtype=self.torch_dtype_of(name))
            yield self.read_rows(name, out, start)

    def _read_into(self, name: str, out: torch.Tensor, byte_offset: int) -> torch.Tensor:
        path = os.path.join(self.hf_dir, self.file_of[name])
        # A buffer over out's memory through ctypes, not numpy: a tensor once shared with numpy can never
        # have its storage freed early (the streaming writer frees each chunk it has written).
        nbytes = out.numel() * out.element_size()
        buf = memoryview((ctypes.c_ubyte * nbytes).from_address(out.data_ptr())).cast("B")
        try:
            with open(path, "rb") as f:
                f.seek(self.offset[name] + byte_offset)
                got = f.readinto(buf)
        except OSError as e:
            raise ConversionError(f"{path}: cannot read {name}: {e}") from None
        if got != nbytes:
            raise ConversionError(f"{path}: {name} is cut short ({got} of {nbytes} bytes)")
        return out

    def dtype_of(self, name: str) -> str:
        return self.header[name][0]

    def torch_dtype_of(self, name: str) -> torch.dtype:
        """The torch dtype of one tensor (the source's precision, kept by the conversion)."""
        dtype = self.header[name][0]
        if dtype not in _ST_TO_TORCH:
            raise ConversionError(f"{self.hf_dir}: {name} has dtype {dtype}; expected F32, F16 or BF16")
        return _ST_TO_TORCH[dtype]


def _read_safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Parse a safetensors header and check that the data it describes is all in the file."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: corrupt safetensors file ({e})") from None
    out = {}
    data_size = size - 8 - n
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        nbytes = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
        if end - begin != nbytes:
            raise ConversionError(f"{path}: {name} ({dtype} {list(shape)}) should take {nbytes} bytes, "
                                  f"its offsets say {end - begin}")
        end_max = max(end_max, end)
        out[name] = (dtype, shape, 8 + n + begin)
    if end_max > data_size:
        raise ConversionError(f"{path}: truncated: its header describes {end_max} bytes of data, the file holds "
                              f"{data_size} (an incomplete download or copy?)")
    return out


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: int = 0
    begin: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class StreamingSafetensorsWriter:
    """Write safetensors shards one tensor at a time.

    All names, shapes and dtypes are known before any data is converted (they follow from the mapping
    table), so each shard's header is laid out up front and each tensor is written as soon as it is
    converted: memory holds one converted tensor, never a shard. Tensors must be written in plan order.
    """

    def __init__(self, out_dir: str, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.out_dir = out_dir
        self.items = [_Planned(n, tuple(s), d) for n, s, d in plan]
        shard, used = 0, 0
        for it in self.items:
            if used and used + it.nbytes > max_shard_bytes:
                shard, used = shard + 1, 0
            it.shard, it.begin = shard, used
            used += it.nbytes
        self.num_shards = shard + 1
        self._next = 0
        self._file = None
        self._file_shard = -1

    def shard_name(self, shard: int) -> str:
        if self.num_shards == 1:
            return "model.safetensors"
        return f"model-{shard + 1:05d}-of-{self.num_shards:05d}.safetensors"

    def _open(self, shard: int):
        if self._file is not None:
            self._file.close()
        header = {"__metadata__": {"format": "pt"}}
        for it in self.items:
            if it.shard == shard:
                header[it.name] = {"dtype": _TORCH_TO_ST[it.dtype], "shape": list(it.shape),
                                   "data_offsets": [it.begin, it.begin + it.nbytes]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(os.path.join(self.out_dir, self.shard_name(shard)), "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file_shard = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        it = self.items[self._next]
        if it.name != name:
            raise RuntimeError(f"writer expected {it.name}, got {name}")
        if tuple(tensor.shape) != it.shape or tensor.dtype != it.dtype:
            raise RuntimeError(f"{name}: planned {it.dtype} {list(it.shape)}, got {tensor.dtype} {list(tensor.shape)}")
        if it.shard != self._file_shard:
            self._open(it.shard)
        t = tensor.detach().contiguous().cpu()
        self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.items):
            raise RuntimeError(f"only {self._next} of {len(self.items)} tensors were written")
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.num_shards > 1:
            index = {
                "metadata": {"total_size": sum(it.nbytes for it in self.items)},
                "weight_map": {it.name: self.shard_name(it.shard) for it in self.items},
            }
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)


def parse_size(text: str) -> int:
    """``--max-shard-size``: "5GB", "500MiB", "1000" (bytes) -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)
