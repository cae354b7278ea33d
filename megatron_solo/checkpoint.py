"""Megatron-LM-layout checkpoints on megatron-core ``dist_checkpointing`` (torch_dist).

Layout (see docs/ARCHITECTURE.md)::

    SAVE/latest_checkpointed_iteration.txt   # replaced atomically, only after a complete save
    SAVE/iter_0001200/                        # dist_checkpointing: model(s), optimizer, scheduler, RNG
    SAVE/iter_0001200/solo_checkpoint.json    # written last: a directory without it is incomplete

Every rank takes part in save and load. A checkpoint saved at one TP/PP/virtual-pipeline layout loads at
another: megatron-core names every layer's tensors by its *global* layer number (TransformerBlock's
``sharded_offsets``), so the stored keys do not depend on how layers are split into stages or chunks; the
``model``/``model0``/``model1`` names of the chunks are only paths in the request dict. Model and
distributed-optimizer state are saved in megatron-core's reshardable formats (the optimizer's
``fully_reshardable``, gathered on DP rank 0 at save; loading it without TE/apex needs
:func:`megatron_solo.mcore_fixes.apply`). The optimizer's request is nested per chunk, because the chunks'
dict keys hold *local* layer numbers, which repeat. RNG state is per (PP, TP) rank and is restored only
when TP and PP are unchanged; other layouts start their RNG from the seed (no dropout in SOLO's recipe).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import torch

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_solo import cpu_backend
# the directory layout (torch-free: the launchers' pre-flight reads it before torch loads)
from megatron_solo.checkpoint_dirs import INFO, TRACKER, complete_iterations, is_complete, iteration_dir, latest_iteration
from megatron_solo.parameter_names import is_lora_parameter, is_vision_expert_parameter, text_twin_name
from megatron_solo.spec import MISTRAL_VOCAB, SoloVocab

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def read_checkpoint_info(root: str, iteration: int | None = None) -> dict:
    """``solo_checkpoint.json`` of a checkpoint (``root`` may also be an ``iter_*`` directory)."""
    if is_complete(root):
        path = root
    else:
        if iteration is None:
            iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"no complete checkpoint under {root}")
        path = iteration_dir(root, iteration)
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete checkpoint (no {INFO})")
    with open(os.path.join(path, INFO)) as f:
        info = json.load(f)
    info["path"] = path
    return info


# A fingerprint reads this much of each tensor file: the whole of a small one, else blocks spread over it.
_FINGERPRINT_BLOCK, _FINGERPRINT_BLOCKS = 1 << 16, 64


def checkpoint_fingerprint(path: str) -> str:
    """A short hash of one checkpoint's tensor files (``path``: an ``iter_*`` directory): megatron-core's
    ``.metadata`` and every ``*.distcp`` file, by name, size and content (whole when under 4 MiB, else 64
    blocks of 64 KiB spread evenly: a base of any size is fingerprinted in milliseconds; two bases that
    differ in their weights differ nearly everywhere). What a LoRA checkpoint names its base by."""
    import hashlib

    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(path) if n == ".metadata" or n.endswith(".distcp"))
    if not names:
        raise CheckpointError(f"{path}: no tensor files to fingerprint")
    for name in names:
        size = os.path.getsize(os.path.join(path, name))
        h.update(f"{name}:{size};".encode())
        with open(os.path.join(path, name), "rb") as f:
            if size <= _FINGERPRINT_BLOCK * _FINGERPRINT_BLOCKS:
                h.update(f.read())
                continue
            step = (size - _FINGERPRINT_BLOCK) // (_FINGERPRINT_BLOCKS - 1)
            for i in range(_FINGERPRINT_BLOCKS):
                f.seek(i * step)
                h.update(f.read(_FINGERPRINT_BLOCK))
    return h.hexdigest()[:16]


def checkpoint_lora(info: dict) -> dict | None:
    """The LoRA record of a checkpoint (``args``' ``lora``: rank, alpha, dropout, targets and the ``base`` it
    adapts: path and fingerprint), or None: a checkpoint without adapters."""
    return (info.get("args") or {}).get("lora") or None


# The architecture fields a checkpoint's tensors depend on: a model that differs in one cannot load it.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "vocab_size", "patch_dim", "qkv_bias", "qk_layernorm", "tie_word_embeddings")


def shape_differences(saved: dict, model_args) -> list[str]:
    """The SHAPE_FIELDS in which ``model_args`` differs from a checkpoint's recorded ``model_args``
    (``solo_checkpoint.json``; a field it does not record is not compared)."""
    want = dataclasses.asdict(model_args)
    return [k for k in SHAPE_FIELDS if k in saved and saved[k] != want[k]]


def checkpoint_vocab(info: dict) -> SoloVocab | None:
    """SOLO's vocabulary of a checkpoint (``solo_checkpoint.json``'s ``vocab``: its tokenizer's ids). One
    saved without it holds Mistral's when its model has Mistral's 33031 ids (checkpoints made before
    vocabularies were stored); else None: nothing says."""
    # a conversion may record it among its args (``convert.megatron_io``) rather than as save_checkpoint's vocab
    stored = info.get("vocab") or (info.get("args") or {}).get("vocab")
    if stored:
        return SoloVocab.from_dict(stored)
    return MISTRAL_VOCAB if (info.get("model_args") or {}).get("vocab_size") == MISTRAL_VOCAB.size else None


def checkpoint_row_separator(info: dict) -> bool | None:
    """The image layout of the data a checkpoint's model saw (``args``' ``row_separator``: True, row
    separators, SOLO's; False, none). A trained checkpoint saved before the layout was recorded saw SOLO's
    layout, the only one there was; a conversion records a SOLO export's own and nothing for a base (it saw
    no image): None."""
    args = info.get("args") or {}
    if "row_separator" in args:
        return bool(args["row_separator"])
    return None if "converted_from" in args else True


def checkpoint_chat_template(info: dict) -> str | None:
    """The chat template (``--chat-template`` of its chat data) a checkpoint's model was tuned with
    (``args``' ``chat_template``); None where nothing says (a base, pre-training only, older runs)."""
    return (info.get("args") or {}).get("chat_template")


def _layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_sharded_object() -> ShardedObject:
    state = {
        "random": __import__("random").getstate(),
        "np": __import__("numpy").random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": None if cpu_backend.is_active() else torch.cuda.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp = _layout()["pp"], _layout()["tp"]
    return ShardedObject(
        "rng_state",
        [state],
        (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _set_rng(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and not cpu_backend.is_active():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _unwrap(m):
    while hasattr(m, "module"):
        m = m.module
    return m


def _sharded_state(model_chunks, optimizer, include_optimizer: bool, include_rng: bool, is_loading: bool):
    sd: dict[str, Any] = {}
    n = len(model_chunks)
    for i, chunk in enumerate(model_chunks):
        sd[_model_key(i, n)] = _unwrap(chunk).sharded_state_dict()
    if include_optimizer and optimizer is not None:
        if is_loading:
            _ensure_optimizer_state(optimizer)
        # Nested per chunk: the dict keys hold *local* layer numbers, which repeat across chunks.
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
        )
    if include_rng:
        sd["rng_state"] = _rng_sharded_object()
    return sd


def _ensure_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state tensors a load fills in.

    torch's Adam creates its state lazily at the first step, and megatron-core's distributed optimizer
    (without TE/apex) reads ``state[p]["step"]`` while building the sharded state dict to load into.
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None or getattr(sub, "init_state_fn", None) is None:
            continue
        sub.init_state_fn(inner, sub.config)
        for group in inner.param_groups:
            for p in group["params"]:
                if inner.state[p] and "step" not in inner.state[p]:
                    inner.state[p]["step"] = torch.tensor(0.0)


# The per-group values the scheduler reads; megatron-core also matches saved groups to the current ones by
# them (param_group_identifier_keys), so a changed --lr finds no saved group (KeyError) unless they agree.
_GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _take_current_group_schedule(optimizer, saved) -> None:
    """Write the current groups' schedule values into the saved groups, pairing them by position: the
    groups are built by the same code from the same group flags (param_groups.check_resume ensured it)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    saved_subs = [saved] if len(subs) == 1 else (
        [v for _, v in sorted(saved.items())] if isinstance(saved, dict) else list(saved))
    for sub, sub_state in zip(subs, saved_subs):
        groups = (sub_state["optimizer"] if "optimizer" in sub_state else sub_state)["param_groups"]
        current = sub.optimizer.param_groups
        if len(groups) != len(current):
            continue  # megatron-core's own matching reports it
        for cur, old in zip(current, groups):
            for k in _GROUP_SCHEDULE_KEYS:
                if k in cur:
                    old[k] = cur[k]


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core's distributed optimizer (without TE/apex) restores torch Adam's ``step`` as ONE tensor
    object shared by every parameter's state; torch increments it in place once per parameter, so the
    bias correction after a resume would differ from an uninterrupted run. Give each its own copy."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for st in inner.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model_chunks,
    optimizer=None,
    opt_param_scheduler=None,
    *,
    model_args,
    padded_vocab_size: int,
    consumed_train_samples: int = 0,
    args: dict | None = None,
    tokenizer_model: str | None = None,
    vocab: SoloVocab | None = None,
    keep_last: int | None = None,
    extra: dict | None = None,
    sharded_strategy=None,
) -> str:
    """Collective save of model(s), optimizer, scheduler and RNG; marks the checkpoint complete last.

    ``sharded_strategy``: megatron-core's save strategy to use instead of its default torch_dist one (the
    conversion's streaming writer, :mod:`megatron_solo.convert.dcp_stream`)."""
    import dataclasses

    path = iteration_dir(save_dir, iteration)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.isdir(path):  # an interrupted or superseded save of this iteration
            shutil.rmtree(path)
        os.makedirs(path)
    torch.distributed.barrier()

    sd = _sharded_state(model_chunks, optimizer, include_optimizer=optimizer is not None,
                        include_rng=True, is_loading=False)
    # Plain (non-sharded) values go to megatron-core's common state, written once by rank 0.
    sd["iteration"] = iteration
    sd["consumed_train_samples"] = consumed_train_samples
    if opt_param_scheduler is not None:
        sd["opt_param_scheduler"] = opt_param_scheduler.state_dict()
    if extra:
        sd["extra"] = extra
    dist_checkpointing.save(sd, path, sharded_strategy=sharded_strategy)
    torch.distributed.barrier()

    if rank0:
        info = {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "consumed_train_samples": consumed_train_samples,
            "model_args": dataclasses.asdict(model_args) if dataclasses.is_dataclass(model_args) else dict(model_args),
            "padded_vocab_size": int(padded_vocab_size),
            "layout": _layout(),
            "has_optimizer": optimizer is not None,
            "num_model_chunks": len(model_chunks),
            "tokenizer_model": tokenizer_model,
            "vocab": None if vocab is None else vocab.to_dict(),
            "args": args or {},
        }
        _atomic_write(os.path.join(path, INFO), json.dumps(info, indent=2, default=str))
        if not is_complete(path):
            raise CheckpointError(f"checkpoint {path} failed validation after save")
        _atomic_write(os.path.join(save_dir, TRACKER), str(iteration))
        if keep_last:
            for old in complete_iterations(save_dir)[:-keep_last]:
                shutil.rmtree(iteration_dir(save_dir, old), ignore_errors=True)
    torch.distributed.barrier()
    return path


def load_checkpoint(
    load_dir: str,
    model_chunks,
    optimizer=None,
    opt_param_scheduler=None,
    *,
    iteration: int | None = None,
    finetune: bool = False,
    load_optim: bool = True,
    load_rng: bool = True,
    strict: bool = True,
    info: dict | None = None,
    schedule_from_flags: bool = False,
) -> dict:
    """Collective load. ``finetune`` loads weights only (iteration, optimizer, scheduler reset).

    ``info``: the checkpoint's info dict when the caller has already read it (it is read once per load).
    Returns the checkpoint's info dict (``solo_checkpoint.json``) with ``path``; when ``finetune`` the
    caller should restart at iteration 0. Any number of model chunks loads any saved number.
    ``schedule_from_flags`` (--override-opt_param-scheduler): the optimizer's groups keep the run's learning
    rates and weight decay instead of the saved ones.
    """
    if info is None:
        info = read_checkpoint_info(load_dir, iteration)
    path = info["path"]
    same_layout = info.get("layout", {}).get("tp") == _layout()["tp"] and info.get("layout", {}).get("pp") == _layout()["pp"]
    want_optim = bool(optimizer is not None and load_optim and not finetune and info.get("has_optimizer"))
    want_rng = bool(load_rng and not finetune and same_layout)
    if load_rng and not finetune and not same_layout and torch.distributed.get_rank() == 0:
        print(f" > {path}: saved at TP={info['layout']['tp']} PP={info['layout']['pp']}, loading at "
              f"TP={_layout()['tp']} PP={_layout()['pp']}: RNG state restarts from the seed", flush=True)
    sd = _sharded_state(model_chunks, optimizer, include_optimizer=want_optim, include_rng=want_rng, is_loading=True)
    copy_experts = _experts_to_copy(model_chunks, info, finetune)
    fresh_adapters = _adapters_to_start(model_chunks, info, finetune)

    def not_in_checkpoint(key: str) -> bool:
        return (copy_experts and is_vision_expert_parameter(key)) or (fresh_adapters and is_lora_parameter(key))

    n = len(model_chunks)
    if copy_experts or fresh_adapters:  # experts: copied from their text twins after the load; adapters: as built
        for i in range(n):
            sd[_model_key(i, n)] = {k: v for k, v in sd[_model_key(i, n)].items() if not not_in_checkpoint(k)}
    state = dist_checkpointing.load(sd, path, strict="raise_unexpected" if strict else "log_unexpected")
    # Keys we did not ask for (e.g. the optimizer under --finetune) are fine; keys we need must exist.
    for i, chunk in enumerate(model_chunks):
        missing, unexpected = _unwrap(chunk).load_state_dict(
            state[_model_key(i, n)], strict=strict and not (copy_experts or fresh_adapters))
        if strict and (unexpected or any(not not_in_checkpoint(k) for k in missing)):
            raise CheckpointError(f"{path}: state does not match the model (missing {missing}, unexpected {unexpected})")
    if fresh_adapters and torch.distributed.get_rank() == 0:
        print(f" > {path} holds no LoRA adapters: it is the base they adapt; they start as built (B = 0)", flush=True)
    if copy_experts:
        copied = sum(copy_text_twins(_unwrap(chunk)) for chunk in model_chunks)
        if torch.distributed.get_rank() == 0:
            print(f" > {path} has no vision experts: each of the model's ({copied} tensors on rank 0) starts as a "
                  "copy of its text twin", flush=True)
    if want_optim:
        if schedule_from_flags:
            _take_current_group_schedule(optimizer, state["optimizer"])
        optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(optimizer)
    if opt_param_scheduler is not None and not finetune and "opt_param_scheduler" in state:
        opt_param_scheduler.load_state_dict(state["opt_param_scheduler"])
    if want_rng and "rng_state" in state:
        rng = state["rng_state"]
        _set_rng(rng[0] if isinstance(rng, list) else rng)
    if finetune:
        info = dict(info, iteration=0, consumed_train_samples=0)
    return info


def _experts_to_copy(model_chunks, info: dict, finetune: bool) -> bool:
    """Whether the model has vision experts the checkpoint lacks (their start: copies of the text twins,
    as EVEv2 and Mono-InternVL begin; a new stage only, ``--finetune``)."""
    has_experts = any(is_vision_expert_parameter(n) for c in model_chunks for n, _ in _unwrap(c).named_parameters())
    saved = (info.get("model_args") or {}).get("vision_experts", "none")
    if not has_experts or saved != "none":
        return False
    if not finetune:
        raise CheckpointError(f"{info['path']} has no vision experts: start a model with experts from it with "
                              "--finetune (each expert then starts as a copy of its text twin)")
    return True


def _adapters_to_start(model_chunks, info: dict, finetune: bool) -> bool:
    """Whether the model has LoRA adapters the checkpoint lacks: the checkpoint is their base (a new stage
    only, ``--finetune``; the run's configuration refuses the rest with one line first)."""
    has_adapters = any(is_lora_parameter(n) for c in model_chunks for n, _ in _unwrap(c).named_parameters())
    if not has_adapters or checkpoint_lora(info):
        return False
    if not finetune:
        raise CheckpointError(f"{info['path']} holds no LoRA adapters: start adapters on it with --finetune")
    return True


def copy_text_twins(model) -> int:
    """Copy every vision expert's text twin into it (same shape and TP shard); returns the count."""
    params = dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in params.items():
            if is_vision_expert_parameter(name):
                p.copy_(params[text_twin_name(name)])
                n += 1
    return n


def load_model_weights(model_chunks, info: dict) -> dict:
    """Only the weights of the checkpoint described by ``info`` (from :func:`read_checkpoint_info`, read
    once by the caller) into ``model_chunks``, at any TP/PP/VPP layout.

    Every parameter is set to NaN first and checked after, so a weight the checkpoint lacks cannot pass
    silently; what a weights-only load does not want (optimizer, RNG) is skipped.
    """
    with torch.no_grad():
        for chunk in model_chunks:
            for p in chunk.parameters():
                p.fill_(float("nan"))
    load_checkpoint(info["path"], model_chunks, info=info, load_optim=False, load_rng=False, strict=False)
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if torch.isnan(p).any():
                raise CheckpointError(f"{info['path']}: {name} was not in the checkpoint (or holds NaN)")
    return info


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
