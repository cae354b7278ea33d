"""Run unmodified megatron-core on CPU processes (gloo) when CUDA is absent.

megatron-core assumes a GPU in a handful of places: device literals (``device="cuda"``,
``.cuda()``), ``torch.cuda.current_device()``, the CUDA RNG used by its model-parallel RNG
tracker, stream/event objects in DDP, and ``Tensor.type()`` checks in the optimizer
(``'torch.cuda.FloatTensor'``). This module maps each of them onto the CPU, in one place:

* ``torch.cuda.current_device()`` answers ``"cpu"``, so ``torch.empty(..., device=current_device())``
  lands on the CPU;
* torch's factory functions, ``Tensor.new_*``, ``Tensor.to`` and ``Tensor/Module.cuda()`` map a
  ``cuda`` device argument to the CPU (patched on the functions, so it also holds inside autograd's
  backward, where activation recompute re-runs forward code), and a ``TorchFunctionMode`` catches any
  other ``device="cuda"`` in forward code (``torch.tensor`` among them);
* the CUDA RNG calls (``torch.cuda.manual_seed/get_rng_state/set_rng_state`` and the tracker's
  ``_get/_set_cuda_rng_state``) act on the CPU generator, which is what CPU dropout draws from;
* ``Tensor.type()`` reports ``torch.cuda.*`` names for CPU tensors (the optimizer asserts them), and the
  inference helpers' ``is_cuda`` assertion (``communication_utils._is_cuda``) accepts them;
* streams, events, ``synchronize``, nvtx and the memory counters are no-ops.

It activates only when ``torch.cuda.is_available()`` is False, so it can never leak into the GPU
path. Importing any megatron_solo module changes nothing: :func:`ensure` (idempotent) is an explicit call
made by the entry points (the trainer's ``main``, each tool that runs megatron-core, benchmarks, the test
fixtures). :func:`deactivate` restores every patched object, and :func:`suspended` runs a block on plain
torch (third-party reference models such as transformers' Mistral run there).

Model configs built for the CPU must also set ``use_cpu_initialization=True``,
``gradient_accumulation_fusion=False``, no fused bias-dropout/RoPE/softmax and
``persist_layer_norm=False``; :func:`cpu_config_overrides` returns exactly those fields.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_MODE = None
# (owner, attribute name, original value) of every patched attribute, so that deactivate() restores them.
# (None: the attribute was inherited, e.g. Tensor.to from TensorBase, and is deleted again.)
_SAVED: list[tuple[object, str, object]] = []


def _set(owner, name: str, value) -> None:
    own = vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name)
    _SAVED.append((owner, name, own))
    setattr(owner, name, value)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_active() -> bool:
    return _ACTIVE


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


# torch's factories that take a ``device``: rewritten at the function itself, because a TorchFunctionMode
# is thread-local state that autograd does not carry into ``Function.backward`` (activation recompute
# re-runs megatron's forward code there). ``torch.tensor`` stays unwrapped (wrapping it changed
# transformers' Mistral outputs); the mode below still catches it, and every other call, in forward code.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "arange", "range", "linspace", "logspace", "eye",
    "as_tensor", "rand", "randn", "randint", "randperm", "empty_like", "zeros_like", "ones_like",
    "full_like", "rand_like", "randn_like", "randint_like", "empty_strided", "scalar_tensor",
    "tril_indices", "triu_indices", "normal",
)
_TENSOR_NEW = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def _device_kwarg_to_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper._solo_cpu_wrapped = True
    return wrapper


class _CudaToCpuMode(TorchFunctionMode):
    """Catch-all for CUDA placement in forward code that the wrappers above do not cover."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def _patch_device_literals():
    for name in _FACTORIES:
        fn = getattr(torch, name, None)
        if fn is not None and not getattr(fn, "_solo_cpu_wrapped", False):
            _set(torch, name, _device_kwarg_to_cpu(fn))
    for name in _TENSOR_NEW:
        _set(torch.Tensor, name, _device_kwarg_to_cpu(getattr(torch.Tensor, name)))
    orig_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = ("cpu", *args[1:])
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        return orig_to(self, *args, **kwargs)

    _set(torch.Tensor, "to", to)
    _set(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _set(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    _set(torch.nn.Module, "cuda", lambda self, *a, **k: self)


_ORIG_TYPE = torch.Tensor.type
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    # Only the query form changes: a CPU tensor plays the part of a CUDA tensor for megatron-core.
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _CUDA_TYPE_NAMES.get(self.dtype, _ORIG_TYPE(self))
    return _ORIG_TYPE(self, dtype, non_blocking, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_manual_seed(seed):
    torch.random.default_generator.manual_seed(int(seed))


def _cpu_get_rng_state(device=None, *args, **kwargs):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=None, *args, **kwargs):
    torch.set_rng_state(new_state)


def _patch_torch_cuda():
    cuda = torch.cuda
    _set(cuda, "current_device", lambda: "cpu")
    _set(cuda, "set_device", lambda *a, **k: None)
    _set(cuda, "device_count", lambda: 0)
    _set(cuda, "synchronize", lambda *a, **k: None)
    _set(cuda, "empty_cache", lambda *a, **k: None)
    _set(cuda, "manual_seed", _cpu_manual_seed)
    _set(cuda, "manual_seed_all", _cpu_manual_seed)
    _set(cuda, "get_rng_state", _cpu_get_rng_state)
    _set(cuda, "set_rng_state", _cpu_set_rng_state)
    _set(cuda.random, "get_rng_state", _cpu_get_rng_state)
    _set(cuda.random, "set_rng_state", _cpu_set_rng_state)
    _set(cuda, "Stream", _NullStream)
    _set(cuda, "Event", _NullStream)
    _set(cuda, "current_stream", lambda *a, **k: _NullStream())
    _set(cuda, "default_stream", lambda *a, **k: _NullStream())
    _set(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _set(cuda, "memory_allocated", lambda *a, **k: 0)
    _set(cuda, "max_memory_allocated", lambda *a, **k: 0)
    _set(cuda, "memory_reserved", lambda *a, **k: 0)
    _set(cuda, "max_memory_reserved", lambda *a, **k: 0)
    _set(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    _set(cuda, "memory_stats", lambda *a, **k: {})
    _set(cuda.nvtx, "range_push", lambda *a, **k: None)
    _set(cuda.nvtx, "range_pop", lambda *a, **k: None)
    _set(cuda.nvtx, "range", lambda *a, **k: contextlib.nullcontext())


def _patch_megatron_rng():
    from megatron.core.tensor_parallel import random as mrandom

    _set(mrandom, "_get_cuda_rng_state",
         lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    _set(mrandom, "_set_cuda_rng_state",
         lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    # The tracker warns when the CPU RNG moves inside a fork; on this backend the "CUDA" RNG *is* the
    # CPU RNG, so that warning fires on every forked dropout and says nothing.
    logger = logging.getLogger(mrandom.__name__)
    if _quiet_rng_warning not in logger.filters:
        logger.addFilter(_quiet_rng_warning)


def _patch_megatron_inference():
    # megatron-core's inference helpers that broadcast between pipeline stages assert ``tensor.is_cuda``.
    from megatron.core.inference import communication_utils

    def _is_cuda(tensor):
        assert tensor is not None

    _set(communication_utils, "_is_cuda", _is_cuda)


def _quiet_rng_warning(record) -> bool:
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def ensure() -> bool:
    """Activate the CPU backend if CUDA is absent. Returns True when it is active."""
    global _ACTIVE, _MODE
    if _ACTIVE:
        return True
    if cuda_available():
        return False
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _patch_torch_cuda()
    _set(torch.Tensor, "type", _tensor_type)
    _patch_device_literals()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _patch_megatron_rng()
    _patch_megatron_inference()
    _ACTIVE = True
    return True


activate = ensure


def deactivate() -> None:
    """Undo :func:`ensure`: torch and megatron-core get back every original object."""
    global _ACTIVE, _MODE
    if not _ACTIVE:
        return
    _MODE.__exit__(None, None, None)
    _MODE = None
    while _SAVED:
        owner, name, original = _SAVED.pop()
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _ACTIVE = False


@contextlib.contextmanager
def activated():
    """The CPU backend for the block only (restores the previous state after it)."""
    was_active = _ACTIVE
    ensure()
    try:
        yield
    finally:
        if not was_active:
            deactivate()


@contextlib.contextmanager
def suspended():
    """Plain torch for the block (for third-party reference models), the backend again after it."""
    was_active = _ACTIVE
    deactivate()
    try:
        yield
    finally:
        if was_active:
            ensure()


def device() -> torch.device:
    """The device this process computes on."""
    return torch.device("cpu") if (_ACTIVE or not cuda_available()) else torch.device("cuda", torch.cuda.current_device())


def dist_backend() -> str:
    return "gloo" if (_ACTIVE or not cuda_available()) else "nccl"


def cpu_config_overrides() -> dict:
    """TransformerConfig fields that the CPU path needs (no fused CUDA kernels, CPU init)."""
    if not (_ACTIVE or not cuda_available()):
        return {}
    return dict(
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
