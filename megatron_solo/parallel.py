"""Process-group and model-parallel initialisation shared by training, conversion and tests."""

from __future__ import annotations

import datetime
import os

import torch

from megatron_solo import cpu_backend
from megatron_solo.netutil import free_port


def init_process_group(timeout_s: int = 600) -> None:
    """Join the torchrun/SLURM world described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT."""
    if not cpu_backend.cuda_available() and not cpu_backend.is_active():
        raise RuntimeError("no CUDA here: call megatron_solo.cpu_backend.ensure() first "
                           "(the entry points do) to run megatron-core on the CPU")
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain `python` run is a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if cpu_backend.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(
        backend=cpu_backend.dist_backend(),
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
) -> None:
    """(Re)build megatron-core's parallel groups and seed every RNG the way Megatron-LM does."""
    from megatron.core import parallel_state, tensor_parallel

    init_process_group()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Megatron's seeding: a different stream per PP stage, model-parallel streams in the tracker."""
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
