"""Build megatron-core modules on torch's ``meta`` device: shapes and dtypes, no memory.

``with torch.device("meta")`` is not enough once :mod:`megatron_solo.cpu_backend` is active: torch's
device context recognises factory functions by identity (a set built on first use), and the CPU
backend replaces ``torch.empty`` & co. with wrappers; megatron-core also passes explicit devices
(``device=torch.cuda.current_device()`` or ``"cpu"``). :func:`meta_device` therefore rewrites the
device of every tensor factory call, by name, inside its block.

Used by the conversion (a model's checkpoint layout without its weights) and the trainer's
``--dry-run`` (each rank's model without memory or GPU).
"""

from __future__ import annotations

import contextlib

from torch.overrides import TorchFunctionMode

_FACTORIES = frozenset({
    "empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint", "arange", "eye",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
})


class _MetaFactories(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _FACTORIES:
            kwargs = dict(kwargs, device="meta")
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """Tensors created by torch's factory functions inside the block live on ``meta``."""
    with _MetaFactories():
        yield
