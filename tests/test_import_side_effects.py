"""Importing megatron_solo's packages changes nothing global (issue 11): the CPU backend and megatron-core's
workarounds are explicit calls of the entry points. Checked in a fresh process, since this suite's own
conftest switches the backend on; and the backend's deactivate() gives torch back its own objects."""

import subprocess
import sys

from tests.conftest import ROOT

CHECK = r"""
import signal, sys, threading
handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
threads, excepthook = threading.active_count(), sys.excepthook
import torch
originals = {"current_device": torch.cuda.current_device, "zeros": torch.zeros, "to": torch.Tensor.to,
             "type": torch.Tensor.type, "get_rng_state": torch.cuda.get_rng_state}
modes_before = torch._C._len_torch_function_stack()
import megatron_solo.model, megatron_solo.training, megatron_solo.training.trainer, megatron_solo.convert
import megatron_solo.convert.megatron_io, megatron_solo.checkpoint, megatron_solo.parallel
import megatron_solo.errors, megatron_solo.training.faults, megatron_solo.train
from megatron.core.optimizer import distrib_optimizer as dopt
# the fault handling (signal handlers, the parent and lock threads) starts only when an entry point calls it
assert {s: signal.getsignal(s) for s in handlers} == handlers, "a signal handler was installed at import"
assert threading.active_count() == threads and sys.excepthook is excepthook, "a thread or hook started at import"

def untouched(where):
    assert torch.cuda.current_device is originals["current_device"], where
    assert torch.zeros is originals["zeros"] and torch.Tensor.to is originals["to"], where
    assert torch.Tensor.type is originals["type"], where
    assert torch.cuda.get_rng_state is originals["get_rng_state"], where
    assert torch._C._len_torch_function_stack() == modes_before, where
    try:
        torch.zeros(1, device="cuda")
    except (RuntimeError, AssertionError):
        pass
    else:
        raise AssertionError(f"{where}: torch.zeros(device='cuda') did not raise")

untouched("after import")
assert not getattr(dopt.DistributedOptimizer, "_solo_patched", False), "megatron-core patched at import"
from megatron_solo import cpu_backend
assert cpu_backend.ensure() and torch.zeros(1, device="cuda").device.type == "cpu"
with cpu_backend.suspended():
    untouched("suspended")
assert torch.zeros(1, device="cuda").device.type == "cpu" and torch.cuda.current_device() == "cpu"
cpu_backend.deactivate()
untouched("after deactivate")
print("OK")
"""


def test_importing_the_packages_leaves_torch_and_megatron_core_untouched():
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]
