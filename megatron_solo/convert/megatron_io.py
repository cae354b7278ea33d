"""Megatron side of the conversion: HF -> megatron_solo checkpoint, checkpoint -> HF, and verification.

Conversion runs the model at TP=1, PP=1 (full tensors, the table's layout); megatron-core's
``dist_checkpointing`` reshards on load, so a checkpoint written here loads at any TP/PP whose TP
divides its padded vocabulary, and any TP/PP checkpoint is read here. Every rank of the current
world takes part (the checkpoint writer is collective); on the command line that is a world of one.

Memory: one model (the parameters are the only full copy) plus the HF tensors of one table row in
flight; HF shards are read and written tensor by tensor (``convert/safetensors_io.py``).

Importing this module loads megatron-core: the tools import it once their input is checked (and
``cpu_backend.ensure()`` has run on a CPU machine); ``megatron_solo.convert`` imports it on first use.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_solo import cpu_backend
from megatron_solo.checkpoint import (
    CheckpointError,
    checkpoint_chat_template,
    checkpoint_lora,
    checkpoint_row_separator,
    checkpoint_vocab,
    latest_iteration,
    load_model_weights,
    read_checkpoint_info,
    save_checkpoint,
)
from megatron_solo.convert.dcp_stream import CheckpointTensorReader, RowCache, StreamingSaveStrategy
from megatron_solo.convert.errors import ConversionError, VerificationError
from megatron_solo.convert.families import FAMILIES
from megatron_solo.convert.full_model import build_full_model, build_meta_model
from megatron_solo.convert.full_model import init_conversion_parallel  # noqa: F401  (part of this module's API)
from megatron_solo.convert.hf_config import check_hf_checkpoint, conversion_shapes, hf_config_from_model_args
from megatron_solo.convert.hf_export_files import (
    copy_tokenizer,
    export_chat_template,
    resolve_tokenizer,
    write_hf_support_files,
)
from megatron_solo.convert.hf_files.processing_solo import normalize_patches
from megatron_solo.convert.lora_export import AdaptedWeights, write_peft_adapter
from megatron_solo.convert.mapping import (
    bound_mappings,
    canonical_megatron_name,
    init_extra_vocab_rows,
    patch_embed_init_std,
)
from megatron_solo.convert.safetensors_io import HFCheckpoint, StreamingSafetensorsWriter, parse_size
from megatron_solo.data.tokenizer import TokenizerError, check_tokenizer
from megatron_solo.model import SoloModelArgs, model_forward_kwargs
from megatron_solo.model.lora import LoraConfig
from megatron_solo.parameter_names import is_lora_parameter
from megatron_solo.model.image_blocks import patch_coords_from_row_separators
from megatron_solo.spec import BASE_VOCAB_SIZE, MISTRAL_VOCAB, PATCH_DIM, SoloVocab, vocab_mismatch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _progress(iterable=None, **kw):
    from tqdm import tqdm

    return tqdm(iterable, disable=not _rank0(), dynamic_ncols=True, **kw)


def model_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Parameters by the table's (local-spec) names; checks that the table covers exactly these."""
    params = {canonical_megatron_name(n): p for n, p in model.named_parameters()}
    return params


def load_weights(model, info: dict) -> None:
    """The weights of the checkpoint ``info`` describes (read once, by :func:`read_checkpoint`) into
    ``model``, at any TP/PP layout; a missing weight is a :class:`ConversionError`."""
    try:
        load_model_weights([model], info)
    except CheckpointError as e:
        raise ConversionError(f"{e} (iteration {info['iteration']})") from None


def _check_coverage(params: dict, mappings) -> None:
    table = {b.megatron for b in mappings}
    missing, extra = sorted(table - set(params)), sorted(set(params) - table)
    if missing or extra:
        raise ConversionError(f"the mapping table and the model disagree: not in the model {missing[:4]}, "
                              f"not in the table {extra[:4]}")


# ------------------------------------------------------------------------------------------------
# HF -> Megatron
# ------------------------------------------------------------------------------------------------


def hf_to_megatron(
    hf_dir: str,
    save_dir: str,
    *,
    tokenizer_model: str | None = None,
    target_tensor_parallel_size: int = 1,
    padded_vocab_size: int | None = None,
    params_dtype=None,
    iteration: int = 0,
    seed: int = 1234,
    verify: bool = False,
    verify_logits: bool | None = None,
    vision_experts: str | None = None,
) -> dict:
    """Write a megatron_solo checkpoint (``save_dir/iter_XXXXXXX``) from a HF base (any family of
    ``convert/families.py``) or SOLO checkpoint.

    The vocabulary is SOLO's over the directory's own tokenizer (extended here with SOLO's pieces when
    the source is a base): the source's first ``base_size`` rows (its tokenizer's full length) are
    kept, the rest (a Qwen base's padding rows, SOLO's pieces, Megatron's padding) are new rows.

    From a Mistral, SOLO is initialised as documented in docs/CONVERSION.md: the tokenizer is extended
    with SOLO's 1031 pieces; every embedding/output row past Mistral's 32000 (new pieces and padding)
    is the mean of Mistral's rows; the patch embedding is N(0, sigma^2) with sigma chosen so that a
    patch enters at the scale of a token embedding (:func:`~megatron_solo.convert.mapping.patch_embed_init_std`).

    Streaming: the model exists only on the meta device; each table row is converted when megatron-core's
    checkpoint writer reaches it (:mod:`megatron_solo.convert.dcp_stream`), in ``params_dtype`` (default:
    the source's own dtype, so bf16 stays bf16). ``verify`` re-reads the written checkpoint one tensor
    at a time (see :func:`verify_tensors`); ``verify_logits`` (default: when the model fits in memory,
    :func:`logits_check_fits`) also compares logits. ``vision_experts`` ('none', 'ffn', 'full'; default:
    the source's, none for a base) adds the image tokens' own weights, each a copy of its text twin
    (the table's ``copies``), so the converted model computes exactly what the source does. Returns a
    summary dict.
    """
    kind, cfg, args, ckpt = check_hf_checkpoint(hf_dir)
    src_dtype = ckpt.torch_dtype_of("model.embed_tokens.weight")
    params_dtype = src_dtype if params_dtype is None else parse_dtype(params_dtype)
    os.makedirs(save_dir, exist_ok=True)
    # The checkpoint keeps its own copy of SOLO's tokenizer (extended here when the source is a base),
    # of the kind the base has (tokenizer.model or tokenizer.json); its ids are SOLO's vocabulary.
    tok_dir = os.path.join(save_dir, "tokenizer")
    if _rank0():
        tok_path = copy_tokenizer(resolve_tokenizer(kind, hf_dir, tokenizer_model, tok_dir), tok_dir)
        tok_path = os.path.abspath(tok_path)
    else:
        tok_path = None
    if torch.distributed.is_initialized():
        shared = [tok_path]
        torch.distributed.broadcast_object_list(shared, src=0)
        tok_path = shared[0]
    try:
        vocab = check_tokenizer(tok_path).vocab
    except TokenizerError as e:
        raise ConversionError(str(e)) from None
    if kind == "solo" and cfg.get("solo_vocab") is not None:
        msg = vocab_mismatch(vocab, SoloVocab.from_dict(cfg["solo_vocab"]), f"the tokenizer {tok_path}",
                             f"{hf_dir}'s config.json")
        if msg:
            raise ConversionError(msg)
    source_rows = vocab.size if kind == "solo" else vocab.base_size
    solo_size = vocab.size
    if source_rows > int(cfg["vocab_size"]):
        raise ConversionError(f"{hf_dir}: the tokenizer has {source_rows} tokens, the model's embedding only "
                              f"{cfg['vocab_size']} rows")
    source_experts = args.get("vision_experts", "none")
    experts = source_experts if vision_experts is None else vision_experts
    if source_experts != "none" and experts != source_experts:
        raise ConversionError(f"{hf_dir} has vision experts '{source_experts}'; converting them to '{experts}' is "
                              f"not supported (leave out --vision-experts to keep them)")
    try:
        model_args = SoloModelArgs(**dict(args, vocab_size=solo_size, vision_patch_id=vocab.vision_patch,
                                          vision_experts=experts))
    except ValueError as e:
        raise ConversionError(str(e)) from None
    padded = padded_vocab_size or model_args.padded_vocab_size(target_tensor_parallel_size)
    if padded < solo_size or padded % target_tensor_parallel_size:
        raise ConversionError(f"padded vocab size {padded} must be >= {solo_size} and divisible by "
                              f"TP={target_tensor_parallel_size}")

    model = build_meta_model(model_args, padded, params_dtype)
    rows = HFRowConverter(ckpt, kind, cfg, model_args, padded, params_dtype, seed, source_rows)
    _check_coverage(model_parameters(model), rows.mappings)
    progress = _progress(total=len(rows.mappings), desc=f"{kind} -> megatron", unit="tensor")
    cache = RowCache(lambda name: rows.convert(name, progress))
    save_checkpoint(save_dir, iteration, [model], model_args=model_args, padded_vocab_size=padded,
                    tokenizer_model=tok_path, sharded_strategy=StreamingSaveStrategy(cache.chunk),
                    vocab=vocab, args={"converted_from": os.path.abspath(hf_dir), "source_kind": kind,
                                       "params_dtype": str(params_dtype).replace("torch.", ""),
                                       # a SOLO export's image layout; a base saw no image (none recorded)
                                       **({"row_separator": cfg.get("vision_row_separator", True) is not False}
                                          if kind == "solo" else {})})
    progress.close()
    if _rank0() and rows.done != len(rows.mappings):
        raise ConversionError(f"only {rows.done} of {len(rows.mappings)} tensors were written")
    summary = {"kind": kind, "save_dir": save_dir, "iteration": iteration, "padded_vocab_size": padded,
               "tokenizer_model": tok_path, "params_dtype": str(params_dtype).replace("torch.", ""),
               "parameters": sum(p.numel() for p in model.parameters())}
    if verify:
        summary["verify"] = verify_checkpoint_against_hf(read_checkpoint_info(save_dir, iteration), hf_dir,
                                                         kind=kind, logits=verify_logits, source_rows=source_rows)
    return summary


class HFRowConverter:
    """The Megatron tensor of one table row, made from the HF tensors it maps (read when asked for)."""

    def __init__(self, ckpt: HFCheckpoint, kind: str, cfg: dict, model_args, padded: int, dtype, seed: int,
                 source_rows: int):
        self.ckpt, self.kind, self.dtype, self.seed = ckpt, kind, dtype, seed
        self.shapes = conversion_shapes(model_args.to_dict(), padded_vocab_size=padded, vocab_size=source_rows,
                                        hf_vocab_rows=int(cfg["vocab_size"]))
        self.mappings = bound_mappings(self.shapes)
        self.by_name = {bm.megatron: bm for bm in self.mappings}
        self.done = 0

    def convert(self, name: str, progress=None) -> torch.Tensor:
        bm = self.by_name[name]
        if bm.rule.solo_only and self.kind != "solo":
            # sigma from the base's embedding table, read again a block of rows at a time (no state kept between rows)
            std = patch_embed_init_std(self.ckpt.row_blocks("model.embed_tokens.weight"))
            g = torch.Generator().manual_seed(self.seed)
            full = (torch.randn(bm.megatron_shape(self.shapes), generator=g, dtype=torch.float32) * std)
        else:  # the source's tensors (a vision expert the source lacks: its text twin's, mapping.py's ``copies``)
            full = bm.read_to_megatron(self.ckpt, self.shapes)
        if tuple(full.shape) != bm.megatron_shape(self.shapes):
            raise ConversionError(f"{name}: converted shape {list(full.shape)} != model's "
                                  f"{list(bm.megatron_shape(self.shapes))}")
        self.done += 1
        if progress is not None:
            progress.update(1)
        return full.to(self.dtype).contiguous()


# ------------------------------------------------------------------------------------------------
# Megatron -> HF
# ------------------------------------------------------------------------------------------------


def read_checkpoint(load_dir: str, iteration: int | None = None) -> dict:
    """The info of a megatron_solo checkpoint (its solo_checkpoint.json), or a :class:`ConversionError`."""
    if not os.path.isdir(load_dir):
        raise ConversionError(f"{load_dir}: no such checkpoint directory")
    if iteration is None:
        iteration = latest_iteration(load_dir)
        if iteration is None:
            raise ConversionError(f"{load_dir}: no complete checkpoint (no latest_checkpointed_iteration.txt)")
        newest = max((int(n[5:]) for n in os.listdir(load_dir) if n.startswith("iter_") and n[5:].isdigit()),
                     default=iteration)
        if newest > iteration:  # said out loud: an interrupted save is never exported silently
            print(f"note: converting iteration {iteration}, the newest complete checkpoint in {load_dir}; "
                  f"iter_{newest:07d} is incomplete (an interrupted save); --iteration N chooses another",
                  file=sys.stderr, flush=True)
    try:
        return read_checkpoint_info(load_dir, iteration)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConversionError(f"{load_dir}: cannot read checkpoint iteration {iteration}: {e}") from None


def _load_full_model(info: dict, params_dtype):
    """The whole model of the checkpoint ``info`` describes, in memory at ``params_dtype`` (the logits
    check only)."""
    model_args = SoloModelArgs(**info["model_args"])
    padded = int(info["padded_vocab_size"])
    model = build_full_model(model_args, padded, params_dtype, lora=checkpoint_lora_config(info))
    load_weights(model, info)
    return model


def checkpoint_lora_config(info: dict) -> LoraConfig | None:
    """The LoRA adapters a checkpoint holds (its ``lora`` record), or None."""
    rec = checkpoint_lora(info)
    return LoraConfig.from_record(rec) if rec else None


def checkpoint_reader(info: dict):
    """A :class:`~megatron_solo.convert.dcp_stream.CheckpointTensorReader` for a checkpoint's info."""
    return CheckpointTensorReader(info, SoloModelArgs(**info["model_args"]), int(info["padded_vocab_size"]),
                                  lora=checkpoint_lora_config(info))


def table_tensors(info: dict, reader):
    """``name -> tensor`` of the mapping table's Megatron parameters: the reader's, merged with their LoRA
    adapters when the checkpoint holds them (``W + (alpha/r) B A``: what the adapted model computes)."""
    lora = checkpoint_lora(info)
    return AdaptedWeights(reader.get, reader.names(), lora).get if lora else reader.get


def resolve_export_tokenizer(path: str | None, model_args, info: dict):
    """(path, SoloVocab) of the export's tokenizer: SOLO's, over a base, with the checkpoint's vocabulary
    (also tools/evaluate.py --load's check)."""
    if not path or not os.path.isfile(path):
        raise ConversionError(f"tokenizer model not found: {path!r} (pass --tokenizer-model)")
    try:
        vocab = check_tokenizer(path).vocab
    except TokenizerError as e:
        raise ConversionError(f"{path}: not SOLO's tokenizer: {e}") from None
    if vocab.size != model_args.vocab_size:
        raise ConversionError(f"{path}: {vocab.size} pieces, the checkpoint's vocabulary is "
                              f"{model_args.vocab_size}")
    stored = checkpoint_vocab(info)
    msg = stored and vocab_mismatch(vocab, stored, f"the tokenizer {path}", "the checkpoint")
    if msg:
        raise ConversionError(msg)
    return path, vocab


def megatron_to_hf(
    load_dir: str,
    save_dir: str,
    *,
    iteration: int | None = None,
    dtype=None,
    max_shard_size: str | int = "5GB",
    tokenizer_model: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    verify_logits: bool | None = None,
    merge_lora: bool = False,
    chat_template: str | None = None,
) -> dict:
    """Export a megatron_solo checkpoint (any TP/PP; latest iteration by default) as a HF SOLO directory.

    ``chat_template``: the template the export's tokenizer and processor write by default (default: the
    one the checkpoint records its model was tuned with, else chatml).

    Streaming: one parameter is read from the checkpoint at a time (megatron-core reshards it to TP=1),
    converted and written to its safetensors shard. ``dtype`` defaults to the checkpoint's own. The
    directory appears complete or not at all (written beside it, then renamed). Padding rows past the
    real vocabulary are dropped. A checkpoint with LoRA adapters (``model/lora.py``) exports them as a PEFT
    adapter directory, or, with ``merge_lora``, as the model with the adapters merged into its weights
    (``convert/lora_export.py``).
    """
    max_shard_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    if os.path.exists(save_dir) and os.listdir(save_dir) and not overwrite:
        raise ConversionError(f"{save_dir} exists and is not empty (pass --overwrite to replace it)")
    info = read_checkpoint(load_dir, iteration)
    iteration = info["iteration"]
    model_args = SoloModelArgs(**info["model_args"])
    padded = int(info["padded_vocab_size"])
    lora = checkpoint_lora(info)
    if merge_lora and not lora:
        raise ConversionError(f"{info['path']} holds no LoRA adapters: drop --merge-lora")
    if lora and not merge_lora and model_args.vision_experts != "none":
        raise ConversionError(f"{info['path']} has vision experts: the exported model routes image tokens inside "
                              "its modules, where PEFT's adapters cannot follow; export with --merge-lora")
    tok_path, vocab = resolve_export_tokenizer(tokenizer_model or info.get("tokenizer_model"), model_args, info)
    chat_template = export_chat_template(chat_template, checkpoint_chat_template(info), vocab)
    reader = checkpoint_reader(info)
    dtype = reader.dtype if dtype is None else parse_dtype(dtype)

    shapes = conversion_shapes(model_args.to_dict(), padded_vocab_size=padded)
    mappings = bound_mappings(shapes)
    _check_coverage({n: None for n in reader.names() if not is_lora_parameter(n)}, mappings)
    summary = {"save_dir": save_dir, "iteration": iteration, "dtype": str(dtype).replace("torch.", "")}
    if lora and not merge_lora:
        return _export_peft_adapter(info, reader, save_dir, mappings, shapes, lora, dtype, summary)
    get = table_tensors(info, reader)
    rank0 = _rank0()
    tmp = None
    if rank0:
        parent = os.path.dirname(os.path.abspath(save_dir)) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(save_dir))}.tmp-", dir=parent)
        umask = os.umask(0o022)  # read it (os has no getter) and put it back at once
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> what os.makedirs gives: the export is shared
    try:
        plan = [(n, s, dtype) for bm in mappings for n, s in bm.hf_shapes(shapes).items()]
        writer = StreamingSafetensorsWriter(tmp, plan, max_shard_bytes) if rank0 else None
        with torch.no_grad():
            for bm in _progress(mappings, desc="megatron -> hf", unit="tensor"):
                full = get(bm.megatron)  # collective: every rank reads
                if rank0:
                    for name, t in bm.to_hf(full, shapes).items():
                        writer.write(name, t.to(dtype))
                del full
        if rank0:
            writer.close()
            row_separator = checkpoint_row_separator(info) is not False  # unknown (a base): SOLO's
            write_hf_support_files(tmp, hf_config_from_model_args(model_args.to_dict(), torch_dtype=summary["dtype"],
                                                                  vocab=vocab, row_separator=row_separator),
                                   tok_path, vocab, row_separator=row_separator, chat_template=chat_template)
            if os.path.exists(save_dir):
                shutil.rmtree(save_dir)
            os.replace(tmp, save_dir)
            summary["num_shards"] = writer.num_shards
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if verify:
        summary["verify"] = verify_checkpoint_against_hf(info, save_dir, kind="solo", logits=verify_logits,
                                                         round_to=dtype)
    return summary


def _export_peft_adapter(info, reader, save_dir, mappings, shapes, lora, dtype, summary) -> dict:
    """The adapters of ``info``'s checkpoint as a PEFT directory (``convert/lora_export.py``), written by rank 0
    beside ``save_dir`` and renamed; the base they adapt is exported from its own checkpoint (``lora['base']``)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has checked ``save_dir`` before rank 0 writes it
    try:
        if _rank0():
            parent = os.path.dirname(os.path.abspath(save_dir)) or "."
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(save_dir))}.tmp-", dir=parent)
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            try:
                summary.update(write_peft_adapter(tmp, AdaptedWeights(reader.get, reader.names(), lora), mappings,
                                                  shapes, lora, dtype, lora.get("base")))
                summary["peft_adapter"] = save_dir
                if os.path.exists(save_dir):
                    shutil.rmtree(save_dir)
                os.replace(tmp, save_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    return summary


# ------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------


def verification_inputs(vocab_size: int, with_image: bool, seed: int = 0, ids: SoloVocab = MISTRAL_VOCAB):
    """A small fixed batch: text ids, and with an image block of 2x3 patches (random pixels)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, min(vocab_size, BASE_VOCAB_SIZE), (2, 12), generator=g)
    if not with_image:
        return torch.cat([torch.ones(2, 1, dtype=torch.long), text], dim=1), None
    rows, cols = 2, 3
    t = ids
    block = [t.vision_start] + [t.vision_patch] * cols + [t.vision_row_sep] + [t.vision_patch] * cols + [t.vision_end]
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.tensor([block, block]), text], dim=1)
    pixels = torch.randint(0, 256, (2 * rows * cols, PATCH_DIM), generator=g, dtype=torch.uint8)
    return ids, normalize_patches(pixels)


def export_vocab(hf_dir: str) -> SoloVocab:
    """The SOLO vocabulary an export's config.json records (SOLO-7B's layout records none: Mistral's)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        d = json.load(f).get("solo_vocab")
    return MISTRAL_VOCAB if d is None else SoloVocab.from_dict(d)


def megatron_logits(model, input_ids: torch.Tensor, vision_patches: torch.Tensor | None = None,
                    model_args: SoloModelArgs | None = None, patch_coords: torch.Tensor | None = None) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V_padded] of a (TP-sharded, PP=1) SOLO model on one document per row.

    ``model_args``: the model's image choices (None: SOLO's); the patches' grid: ``patch_coords`` [n, 2], or,
    when not given, read from the row separators (the layout of :func:`verification_inputs`)."""
    b, s = input_ids.shape
    batch = dict(tokens=input_ids, position_ids=torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
                 doc_lengths=torch.full((b, 1), s), patches=vision_patches)
    if model_args is not None and model_args.image_positions != "1d":
        batch["patch_coords"] = (patch_coords if patch_coords is not None
                                 else patch_coords_from_row_separators(input_ids, model_args.image_tokens))
    with torch.no_grad():
        out = model(**model_forward_kwargs(batch, model.config, model_args=model_args))
    return gather_from_tensor_model_parallel_region(out).float()


def load_hf_model(hf_dir: str, kind: str, dtype=torch.float32):
    """The reference model: the base family's own transformers class (``kind``: its name), or the
    exported SOLO code (trust_remote_code)."""
    import transformers
    from transformers import AutoModelForCausalLM

    if kind != "solo":
        model = getattr(transformers, FAMILIES[kind].hf_class).from_pretrained(hf_dir, dtype=dtype)
    else:
        if not os.path.isfile(os.path.join(hf_dir, "modeling_solo.py")):
            # transformers loads here, for the logits check only (a conversion without it never needs it)
            from megatron_solo.convert.hf_files.modeling_solo import SoloForCausalLM

            model = SoloForCausalLM.from_pretrained(hf_dir, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, trust_remote_code=True)
    return model.eval()


def logits_check_fits(num_parameters: int) -> bool:
    """Whether the logits check (the Megatron model and the HF model, both fp32) fits in this host's
    available memory with a margin: 2 x 4 bytes per parameter, plus half again."""
    import psutil

    return 12 * num_parameters <= psutil.virtual_memory().available


def verify_tensors(get_megatron, hf_dir: str, *, kind: str, model_args: dict, padded_vocab_size: int,
                   source_rows: int | None = None) -> int:
    """Every row of the mapping table, one at a time: ``get_megatron(name)`` (the full TP=1 Megatron
    tensor) through the inverse transform, rounded to the HF tensor's dtype, equals the HF tensor bit for
    bit. From a base: the rows it has, and the rows past its tokenizer (``source_rows``, default: all
    of its embedding's rows) are the documented initialisation. Holds one row of each side at a time.
    Returns the number of HF tensors checked; raises :class:`VerificationError` naming the first mismatch."""
    ckpt = HFCheckpoint(hf_dir)
    hf_rows = ckpt.header["model.embed_tokens.weight"][1][0]
    src_vocab = hf_rows if source_rows is None else source_rows
    shapes = conversion_shapes(dict(model_args, vocab_size=src_vocab), padded_vocab_size=padded_vocab_size,
                               hf_vocab_rows=hf_rows)
    n_checked = 0
    with torch.no_grad():
        for bm in _progress(bound_mappings(shapes, include_solo_only=(kind == "solo")), desc="verify",
                            unit="tensor"):
            p = get_megatron(bm.megatron)
            # A vision expert the HF side lacks (converted from a base) must equal its text twin there.
            names = bm.source_names(ckpt.header)
            for name, t in zip(names, bm.rule.transform.to_hf(p, shapes), strict=True):
                ref = ckpt.get(name)[: t.shape[0]] if bm.rule.transform.name == "vocab_pad" else ckpt.get(name)
                if not torch.equal(t.to(ref.dtype), ref):
                    diff = (t.float() - ref.float()).abs().max().item()
                    raise VerificationError(f"verify: {bm.megatron} -> {name} differs from {hf_dir} "
                                            f"(max abs diff {diff:.3g})")
                n_checked += 1
                del ref
            if bm.rule.transform.name == "vocab_pad" and src_vocab < p.shape[0] and kind != "solo":
                want = init_extra_vocab_rows(p[:src_vocab], p.shape[0] - src_vocab)
                if not torch.allclose(p[src_vocab:].float(), want.float()):
                    raise VerificationError(f"verify: {bm.megatron} rows past {src_vocab} are not the "
                                            "documented initialisation")
            del p
    return n_checked


def verify_checkpoint_against_hf(info: dict, hf_dir: str, *, kind: str, logits: bool | None = None,
                                 round_to=None, source_rows: int | None = None) -> dict:
    """``--verify`` of a written conversion: the checkpoint ``info`` describes against the HF directory,
    tensor by tensor (one of each side in memory, :func:`verify_tensors`); then the logits of both
    models on a small batch when ``logits`` is True, or when it is None and both fit in memory
    (:func:`logits_check_fits`: skipped with a message otherwise)."""
    reader = checkpoint_reader(info)
    n = verify_tensors(table_tensors(info, reader), hf_dir, kind=kind, model_args=info["model_args"],
                       padded_vocab_size=int(info["padded_vocab_size"]), source_rows=source_rows)
    out = {"tensors_checked": n}
    n_params = sum(p.numel() for p in reader.model.parameters())
    if logits is None:
        logits = logits_check_fits(n_params)
        if not logits and _rank0():
            print(f"verify: logits check skipped: two fp32 models of {n_params / 1e9:.2f}B parameters do not fit in "
                  "this host's available memory (--verify-logits runs it anyway)")
    if _rank0():
        print(f"verify: {n} tensors bit-identical")
    if logits:
        model = _load_full_model(info, torch.float32)
        if round_to is not None:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(round_to).to(p.dtype))
        out.update(verify_logits(model, hf_dir, kind=kind, source_rows=source_rows,
                                 model_args=SoloModelArgs(**info["model_args"])))
        del model
    return out


def verify_logits(model, hf_dir: str, *, kind: str, atol: float = 1e-4, rtol: float = 1e-4,
                  source_rows: int | None = None, model_args: SoloModelArgs | None = None) -> dict:
    """Logits of a TP=1 Megatron model and of the HF model on a small batch (text; plus an image for
    SOLO) agree within fp32 tolerance, over the HF vocabulary's first ``source_rows`` (default: all; a
    Qwen base's rows past its tokenizer are not tokens), a half-precision Megatron model: bf16-level
    tolerance."""
    src_vocab = source_rows or HFCheckpoint(hf_dir).header["model.embed_tokens.weight"][1][0]
    ids, patches = verification_inputs(src_vocab, with_image=(kind == "solo"), ids=export_vocab(hf_dir))
    with cpu_backend.suspended(), torch.no_grad():  # the reference runs on plain torch, not on the CPU backend
        hf_model = load_hf_model(hf_dir, kind)
        kw = {} if patches is None else {"vision_patches": patches}
        if patches is not None and model_args is not None and model_args.image_positions != "1d":
            kw["vision_patch_coords"] = patch_coords_from_row_separators(ids, model_args.image_tokens)
        ref = hf_model(input_ids=ids, **kw).logits.float()[..., :src_vocab]
        del hf_model
    got = megatron_logits(model, ids, patches, model_args=model_args)[..., :src_vocab]
    diff = (got - ref).abs().max().item()
    if next(model.parameters()).dtype != torch.float32:
        atol, rtol = max(atol, 5e-2), max(rtol, 5e-2)
    tol = atol + rtol * ref.abs().max().item()
    if not math.isfinite(diff) or diff > tol:
        raise VerificationError(f"verify: logits differ from {hf_dir}: max abs diff {diff:.3g} > {tol:.3g}")
    if _rank0():
        print(f"verify: logits max abs diff {diff:.2e} (tolerance {tol:.1e})")
    return {"max_abs_logit_diff": diff, "tolerance": tol}


def verify_against_hf(model, hf_dir: str, *, kind: str, padded_vocab_size: int, round_to=None,
                      atol: float = 1e-4, rtol: float = 1e-4) -> dict:
    """Parity of an in-memory TP=1 Megatron SOLO model with a HF checkpoint: every tensor
    (:func:`verify_tensors`), then the logits (:func:`verify_logits`). Raises
    :class:`VerificationError` naming the first mismatch."""
    params = model_parameters(model)
    cfg = model.config
    model_args = dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                      num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
                      kv_channels=cfg.kv_channels, qkv_bias=cfg.add_qkv_bias, qk_layernorm=cfg.qk_layernorm,
                      tie_word_embeddings=model.share_embeddings_and_output_weights)
    n = verify_tensors(params.__getitem__, hf_dir, kind=kind, model_args=model_args,
                       padded_vocab_size=padded_vocab_size)
    if round_to is not None:
        with torch.no_grad():
            for p in params.values():
                p.copy_(p.to(round_to).to(p.dtype))
    out = {"tensors_checked": n}
    out.update(verify_logits(model, hf_dir, kind=kind, atol=atol, rtol=rtol))
    return out
