"""The CPU backend's mappings and megatron-core's workarounds (mcore_fixes), each on a case that fails without it."""

import os
import subprocess
import sys

import torch

from megatron_solo import cpu_backend
from tests.conftest import ROOT


def test_active_here_because_cuda_is_absent():
    assert not torch.cuda.is_available()
    assert cpu_backend.ensure() and cpu_backend.is_active()
    assert cpu_backend.dist_backend() == "gloo"
    assert cpu_backend.cpu_config_overrides()["use_cpu_initialization"] is True


def test_device_literals_land_on_cpu_in_forward_and_in_backward():
    assert torch.cuda.current_device() == "cpu"
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu" and torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).new_zeros(3, device="cuda").device.type == "cpu"

    class UsesCudaInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * torch.full((3,), 2.0, device="cuda")

    x = torch.ones(3, requires_grad=True)
    UsesCudaInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))

    from megatron.core.tensor_parallel.random import checkpoint

    y = torch.ones(3, requires_grad=True)
    checkpoint(lambda t: t * torch.arange(3, device="cuda"), False, y).sum().backward()  # re-runs forward in backward
    assert torch.equal(y.grad, torch.arange(3, dtype=torch.float32))


def test_tensor_type_reports_cuda_names_as_megatron_optimizer_expects():
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # the conversion form is untouched


def test_cuda_rng_calls_drive_the_cpu_generator_and_megatron_tracker_forks_it():
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.manual_seed(123)
    a = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(4))
    state = torch.cuda.get_rng_state()
    b = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(b, torch.rand(4))

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 777)
    torch.manual_seed(1)
    outside_before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside_before)  # fork restored the default stream
    torch.manual_seed(777)
    assert torch.equal(inside, torch.rand(4))  # and drew from the tracked seed


def test_gradient_clipping_scales_in_place_bit_identically():
    """mcore_fixes.fix_clip_scales_through_a_copy (applied by the entry points, here by conftest): megatron-core's
    clipping scales each gradient in place, bit for bit what its fallback's ``dst.copy_(src * scale)`` gave,
    without the copy (the fallback's second pass over every gradient)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (300, 7, 4096)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 5
    want = [p.grad * (1.0 / (40.0 + 1.0e-6)) for p in params]  # max_norm / (total_norm + eps), megatron's coefficient
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default:
                copies.append(args[0].numel())
            return func(*args, **(kwargs or {}))

    grads = [p.grad for p in params]
    with Copies():
        clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=40.0)
    assert all(p.grad is t for p, t in zip(params, grads))  # in place
    assert all(torch.equal(p.grad, w) for p, w in zip(params, want)) and sum(copies) < 4096


def bias_gelu_reference(bias, y):
    """megatron-core's tanh-approximated bias-GeLU, written from its definition."""
    x = bias + y
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def test_megatron_core_kernels_compile_on_first_call_and_its_import_loads_no_compiler(monkeypatch):
    """mcore_fixes.defer_fused_kernel_compile (applied by the entry points, here by conftest, before megatron-core
    is imported): megatron-core's ``@jit_fuser`` kernels call torch.compile, with the same options, on their
    first call, once; and importing megatron-core (the model, optimizer, checkpointing, the trainer and the
    converter over it) loads neither dynamo nor inductor, which it did at import before (~2.5 s of CPU a process)."""
    from megatron.core.fusions import fused_bias_gelu

    compiled = []

    def recording_compile(fn, **options):
        compiled.append((fn, options))
        return fn  # eager: the test checks what is compiled and when, not inductor's code

    monkeypatch.setattr(torch, "compile", recording_compile)
    y, bias = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), torch.randn(5)
    kernel = fused_bias_gelu.bias_gelu
    for _ in range(2):
        assert torch.allclose(kernel(bias, y), bias_gelu_reference(bias, y), atol=1e-6)
    assert compiled == [(kernel.__wrapped__, {})]  # compiled once, on the first call, the kernel itself

    check = ("import sys\nfrom megatron_solo import mcore_fixes\nmcore_fixes.apply()\n"
             "import megatron.core.models.gpt, megatron.core.optimizer, megatron.core.dist_checkpointing\n"
             "import megatron_solo.training.trainer, megatron_solo.convert.megatron_io\n"
             "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor'))))")
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout[-2000:] + r.stderr[-3000:]
