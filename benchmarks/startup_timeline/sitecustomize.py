"""The start-up timeline of a launch, recorded by every Python process of it (benchmarks/startup.py --launch).

Only loaded when this directory is on PYTHONPATH and SOLO_TIMELINE names a file (the benchmark sets both for
the launcher it times; torchrun hands the environment to its workers): each process appends lines
``<unix time> <CPU seconds of the process> <pid> <role> <event>`` for its start (the kernel's exec time),
the end of ``import torch`` / ``import megatron.core``, entry and exit of the start-up steps named in
TRACED (where the running tree has them: the baseline's tree lacks some), the first iteration line and its
exit. The functions are wrapped when their module has been executed, before anything binds them by name.
Measuring, not part of the package: nothing here changes what a step does.
"""

import atexit
import functools
import importlib.abc
import os
import sys
import time

_FILE = os.environ.get("SOLO_TIMELINE")

# module -> names wrapped there ("Class.method"); a "!" prefix: record the first call only.
TRACED = {
    "megatron_solo.training.preflight": ["run"],
    "megatron_solo.training.early_checks": ["check_before_imports"],
    "megatron_solo.mcore_fixes": ["apply"],
    "megatron_solo.training.config": ["build_train_config"],
    "megatron_solo.training.faults.inputs": ["check_inputs"],
    "megatron_solo.data.dataset": ["check_split_sizes"],
    "megatron_solo.parallel": ["init_process_group", "initialize_model_parallel"],
    "megatron_solo.training.trainer": ["start_parallel_world", "build_trained_chunks", "build_optimizer_and_scheduler",
                                       "Checkpointer.load_start_state", "build_datasets", "!Trainer.train_step",
                                       "!Checkpointer.save"],
    "megatron_solo.training.logger": ["!TrainingLogger.iteration_line"],
}
IMPORTS = ("torch", "megatron.core", "torch.distributed.run")


_FORKED = []  # set in a forked child (the launchers' pre-flight runs in one, forked by torchrun's agent)


def _role() -> str:
    if _FORKED:
        return "preflight"
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        return f"rank{os.environ['RANK']}"
    with open("/proc/self/cmdline", "rb") as f:  # sys.argv is not set yet while a -m module starts
        argv = f.read().split(b"\0")
    for key, role in ((b"megatron_solo.training.preflight", "preflight"), (b"megatron_solo.training.torchrun", "agent"),
                      (b"torch.distributed.run", "agent")):
        if key in argv:
            return role
    return os.path.basename(argv[1].decode() if len(argv) > 1 else "python")


def _record(event: str, t: float | None = None) -> None:
    line = f"{time.time() if t is None else t:.3f} {time.process_time():.3f} {os.getpid()} {_role()} {event}\n"
    fd = os.open(_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _exec_time() -> float:
    """When the kernel started this process, in unix seconds (its age by /proc's uptime clock, 10 ms ticks)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _wrap(fn, name: str, first_only: bool):
    done = []

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        if first_only and done:
            return fn(*args, **kwargs)
        done.append(1)
        _record(f"{name} start")
        try:
            return fn(*args, **kwargs)
        finally:
            _record(f"{name} end")
    return traced


def _patch(module) -> None:
    for spec in TRACED.get(module.__name__, []):
        first_only = spec.startswith("!")
        path = spec.lstrip("!").split(".")
        owner = module
        for part in path[:-1]:
            owner = getattr(owner, part, None)
        fn = getattr(owner, path[-1], None) if owner is not None else None
        if fn is not None:
            setattr(owner, path[-1], _wrap(fn, spec.lstrip("!"), first_only))


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the watched modules: after the module's code ran, record or patch."""

    def find_spec(self, name, path, target=None):
        if name not in TRACED and name not in IMPORTS:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util

            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_trace(module):
            exec_module(module)
            if name in IMPORTS:
                _record(f"import {name} done")  # a stable name: the benchmark takes medians per event
            _patch(module)
        spec.loader.exec_module = exec_and_trace
        return spec


if _FILE:
    _record("process start", _exec_time())
    _record("interpreter ready")
    sys.meta_path.insert(0, _Finder())
    atexit.register(_record, "exit")
    os.register_at_fork(after_in_child=lambda: (_FORKED.append(1), _record("forked")))
