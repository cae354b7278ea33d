"""Hugging Face side of the conversion: read and check HF checkpoints, write SOLO exports, streaming.

No megatron import here: a bad input is refused (with a message naming the file and tensor) before
megatron-core is imported or a model is built.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass

import torch

from megatron_solo.convert.mapping import ConversionShapes, expected_hf_shapes

HF_FILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_files")
SOLO_VOCAB_SIZE = 33031
BASE_VOCAB_SIZE = 32000


class ConversionError(RuntimeError):
    """Bad input or a failed check: the message says what and where."""


class VerificationError(ConversionError):
    """``--verify`` found a mismatch between the source and the converted model."""


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: not a directory")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def hf_kind(cfg: dict) -> str:
    """'solo' or 'mistral' (a Llama-style checkpoint with Mistral's shapes also counts as mistral)."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") == "solo" or "SoloForCausalLM" in archs:
        return "solo"
    if cfg.get("model_type") in ("mistral", "llama") or any(a in ("MistralForCausalLM", "LlamaForCausalLM")
                                                           for a in archs):
        return "mistral"
    raise ConversionError(f"unsupported checkpoint: model_type={cfg.get('model_type')!r}, architectures={archs}; "
                          "expected a Mistral (MistralForCausalLM) or SOLO (SoloForCausalLM) checkpoint")


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise ConversionError(f"rope_type {rp.get('rope_type')!r} is not supported (SOLO uses plain RoPE)")
    if cfg.get("rope_scaling"):
        raise ConversionError(f"rope_scaling {cfg['rope_scaling']!r} is not supported (SOLO uses plain RoPE)")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def model_args_from_hf_config(cfg: dict) -> dict:
    """SoloModelArgs fields (as a dict) for a Mistral/SOLO HF config. The vocabulary is SOLO's."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {cfg['hidden_act']!r}: SOLO's MLP is SwiGLU (silu)")
    if cfg.get("tie_word_embeddings", False):
        raise ConversionError("tie_word_embeddings=true: SOLO's input embedding and output layer are separate")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConversionError("biases are not supported: SOLO (Mistral) has no biases")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        args = dict(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(cfg.get("num_key_value_heads") or heads),
            kv_channels=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=SOLO_VOCAB_SIZE,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            rotary_base=_rope_theta(cfg),
            norm_epsilon=float(cfg.get("rms_norm_eps", 1e-5)),
            sliding_window=cfg.get("sliding_window"),
            init_method_std=float(cfg.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    if args["rotary_base"] == int(args["rotary_base"]):
        args["rotary_base"] = int(args["rotary_base"])
    if args["num_attention_heads"] % args["num_query_groups"]:
        raise ConversionError(f"num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={args['num_query_groups']}")
    return args


def hf_config_from_model_args(model_args: dict, *, torch_dtype: str = "bfloat16") -> dict:
    """config.json of an exported SOLO checkpoint (Mistral's fields + SOLO's)."""
    a = model_args
    return {
        "architectures": ["SoloForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_solo.SoloConfig",
            "AutoModel": "modeling_solo.SoloModel",
            "AutoModelForCausalLM": "modeling_solo.SoloForCausalLM",
        },
        "model_type": "solo",
        "vocab_size": int(a["vocab_size"]),
        "hidden_size": int(a["hidden_size"]),
        "intermediate_size": int(a["ffn_hidden_size"]),
        "num_hidden_layers": int(a["num_layers"]),
        "num_attention_heads": int(a["num_attention_heads"]),
        "num_key_value_heads": int(a["num_query_groups"]),
        "head_dim": int(a["kv_channels"]),
        "hidden_act": "silu",
        "max_position_embeddings": int(a["max_position_embeddings"]),
        "initializer_range": float(a.get("init_method_std", 0.02)),
        "rms_norm_eps": float(a["norm_epsilon"]),
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(a["rotary_base"])},
        "sliding_window": a.get("sliding_window"),
        "attention_dropout": 0.0,
        "vision_patch_size": 32,
        "vision_start_token_id": 32000,
        "vision_patch_token_id": 32001,
        "vision_row_sep_token_id": 32002,
        "vision_end_token_id": 32004,
        "dtype": torch_dtype,
    }


def conversion_shapes(model_args: dict, padded_vocab_size: int, vocab_size: int | None = None) -> ConversionShapes:
    a = model_args
    return ConversionShapes(
        num_layers=int(a["num_layers"]),
        hidden_size=int(a["hidden_size"]),
        ffn_hidden_size=int(a["ffn_hidden_size"]),
        num_attention_heads=int(a["num_attention_heads"]),
        num_query_groups=int(a["num_query_groups"]),
        head_dim=int(a["kv_channels"]),
        vocab_size=int(vocab_size if vocab_size is not None else a["vocab_size"]),
        padded_vocab_size=int(padded_vocab_size),
    )


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

_IGNORED_KEYS_SUFFIX = ("rotary_emb.inv_freq",)  # buffers some old exports carry


class HFCheckpoint:
    """The safetensors tensors of a HF checkpoint directory, read one at a time (memory-mapped).

    :meth:`check` validates everything that can be checked without reading data: the index, that each
    shard exists and has a valid safetensors header whose data fits in the file, and that every
    expected tensor is present with the expected shape (no unexpected ones).
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
        fname = self.file_of[name]
        path = os.path.join(self.hf_dir, fname)
        dtype, shape = self.header[name]
        if dtype not in _ST_TO_TORCH:
            raise ConversionError(f"{path}: {name} has dtype {dtype}; expected F32, F16 or BF16")
        t = torch.empty(shape, dtype=_ST_TO_TORCH[dtype])
        buf = t.reshape(-1).view(torch.uint8).numpy()
        try:
            with open(path, "rb") as f:
                f.seek(self.offset[name])
                got = f.readinto(memoryview(buf))
        except OSError as e:
            raise ConversionError(f"{path}: cannot read {name}: {e}") from None
        if got != buf.nbytes:
            raise ConversionError(f"{path}: {name} is cut short ({got} of {buf.nbytes} bytes)")
        return t

    def dtype_of(self, name: str) -> str:
        return self.header[name][0]

    def close(self) -> None:
        pass


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


def check_hf_checkpoint(hf_dir: str, tokenizer_model: str | None = None) -> tuple[str, dict, dict, HFCheckpoint]:
    """Validate a Mistral/SOLO HF dir before anything is built; returns (kind, hf config, model args, reader)."""
    cfg = read_hf_config(hf_dir)
    kind = hf_kind(cfg)
    args = model_args_from_hf_config(cfg)
    hf_vocab = int(cfg.get("vocab_size", 0))
    if kind == "solo" and hf_vocab != SOLO_VOCAB_SIZE:
        raise ConversionError(f"{hf_dir}: a SOLO checkpoint has vocab_size {SOLO_VOCAB_SIZE}, config.json says "
                              f"{hf_vocab}")
    if kind == "mistral" and hf_vocab != BASE_VOCAB_SIZE:
        raise ConversionError(f"{hf_dir}: SOLO extends Mistral's {BASE_VOCAB_SIZE}-piece vocabulary, config.json "
                              f"says vocab_size {hf_vocab}")
    ckpt = HFCheckpoint(hf_dir)
    shapes = conversion_shapes(args, padded_vocab_size=hf_vocab, vocab_size=hf_vocab)
    ckpt.check(expected_hf_shapes(shapes, include_solo_only=(kind == "solo")), f"{kind} checkpoint")
    return kind, cfg, args, ckpt


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def resolve_tokenizer(kind: str, hf_dir: str, tokenizer_model: str | None, work_dir: str) -> str:
    """Path of SOLO's extended tokenizer.model for a conversion from ``hf_dir``.

    From a Mistral: ``tokenizer_model`` is Mistral's 32000-piece model (or 'mistral-common'), extended
    here with SOLO's pieces (written into ``work_dir``); a model that already holds them is used as is.
    From a SOLO: the directory's own tokenizer.model (or ``tokenizer_model``), which must be SOLO's.
    """
    from megatron_solo.data.tokenizer import (
        SoloTokenizer,
        create_solo_tokenizer,
        mistral_tokenizer_path,
    )

    if tokenizer_model == "mistral-common":
        tokenizer_model = mistral_tokenizer_path()
    if tokenizer_model is None:
        candidate = os.path.join(hf_dir, "tokenizer.model")
        if kind == "mistral" and not os.path.isfile(candidate):
            raise ConversionError("converting a Mistral checkpoint needs --tokenizer-model (Mistral's "
                                  "tokenizer.model, or 'mistral-common' for the copy in that package)")
        tokenizer_model = candidate
    if not os.path.isfile(tokenizer_model):
        raise ConversionError(f"tokenizer model not found: {tokenizer_model}")
    try:
        tok = SoloTokenizer(tokenizer_model)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on a file it cannot parse
        raise ConversionError(f"{tokenizer_model}: not a SentencePiece model ({e})") from None
    if tok.vocab_size == SOLO_VOCAB_SIZE:
        try:
            tok.check_solo_ids()
        except ValueError as e:
            raise ConversionError(str(e)) from None
        return tokenizer_model
    if kind == "solo":
        raise ConversionError(f"{tokenizer_model}: {tok.vocab_size} pieces; a SOLO checkpoint needs SOLO's "
                              f"{SOLO_VOCAB_SIZE}-piece tokenizer")
    try:
        return create_solo_tokenizer(tokenizer_model, work_dir)
    except ValueError as e:
        raise ConversionError(f"{tokenizer_model}: {e}") from None


def write_tokenizer_files(out_dir: str, tokenizer_model: str) -> None:
    """tokenizer.model plus a LlamaTokenizer config that knows SOLO's special pieces."""
    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    added = {}
    for i in [0, 1, 2, *range(BASE_VOCAB_SIZE, sp.get_piece_size())]:
        added[str(i)] = {"content": sp.id_to_piece(i), "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "legacy": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": 1000000000000000019884624838656,
        "added_tokens_decoder": added,
        "extra_special_tokens": {
            "vision_start_token": "<vision>", "vision_patch_token": "<vpatch>",
            "vision_row_sep_token": "<vrow_sep>", "vision_end_token": "</vision>",
            "im_start_token": "<|im_start|>", "im_end_token": "<|im_end|>",
        },
        "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {},
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


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


def write_hf_support_files(out_dir: str, hf_config: dict, tokenizer_model: str) -> None:
    """config.json, generation_config.json, the remote-code files and the tokenizer."""
    for fname in ("configuration_solo.py", "modeling_solo.py", "processing_solo.py"):
        shutil.copyfile(os.path.join(HF_FILES_DIR, fname), os.path.join(out_dir, fname))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 33030], "do_sample": False, "max_new_tokens": 256}, f,
                  indent=2)
    write_tokenizer_files(out_dir, tokenizer_model)


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


def load_export_processor(hf_dir: str):
    """Import an export's own ``processing_solo.py`` (what a user of the HF directory runs)."""
    import importlib.util

    path = os.path.join(hf_dir, "processing_solo.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir} has no processing_solo.py (not a SOLO export?)")
    spec = importlib.util.spec_from_file_location("processing_solo_export", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
