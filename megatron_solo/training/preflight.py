"""Pre-flight of a launch: every check a run makes at start-up, before torchrun starts its workers.

``examples/common.sh`` has torchrun's agent run it (``python -m megatron_solo.training.torchrun --preflight
--nproc-per-node N --nnodes M --launcher-vars "FLAG=VAR ..." --torchrun ...``, the trainer's flags taken from
torchrun's arguments); ``python -m megatron_solo.training.preflight --nproc-per-node N --nnodes M
--launcher-vars ... -- <the trainer's flags>`` runs it alone. A mistake is one ``error:`` line, printed once,
naming the launcher variable to change, and no worker, process group or traceback is ever started.
``--launcher-vars`` comes from the launchers' table of variables (``LAUNCHER_VARS`` in common.sh, the one
place a variable is tied to its flag; torchrun's ``nproc-per-node``/``nnodes`` included). The checks are the
trainer's own, in two stages:

- ``quick``, with neither torch nor megatron-core (a mistake here answers in about a second): the flags and
  every data prefix's files (:mod:`megatron_solo.training.early_checks`), then
  :func:`check_derived_before_imports`: the world-size arithmetic, the checkpoint a ``--finetune`` starts
  from, a preset too big for a machine without a GPU, every split the run reads having packs;
- ``full``: 1. the flags and every decision derived from them
  (:func:`megatron_solo.training.config.build_train_config`: ``validate_args``, the sizes, the resume plan),
  with the world size torchrun would make; 2. whether the model fits the machine (:func:`check_fits`): no GPU
  and SOLO-7B is refused, naming ``PRESET=tiny``; on GPUs, fewer visible devices than processes per node is
  refused; 3. the inputs (tokenizer, data prefixes, checkpoint shape, ``--save`` writable:
  ``faults.check_inputs``); 4. that every split the run reads has packs
  (:func:`megatron_solo.data.dataset.check_split_sizes`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import types

from megatron_solo import errors, mcore_fixes, quiet
from megatron_solo.presets import PRESETS
from megatron_solo.spec import PATCH_DIM, SOLO_VOCAB_SIZE
from megatron_solo.training import run_plan
from megatron_solo.training.arguments import ArgumentError, build_parser

# Bytes of training state per parameter on the device that holds it: bf16/fp32 weight, fp32 main copy
# and gradient, Adam's two moments (Megatron-LM's accounting without the distributed optimizer's sharding).
TRAIN_BYTES_PER_PARAM = 18


class PreflightError(errors.InputError):
    """The run cannot start as asked (exit 2)."""


def parameter_count(m) -> int:
    """Parameters of a SOLO model from its shape (decoder layers, embedding + output layer, patch projection)."""
    h, f, n, g, d = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
    per_layer = h * (n * d + 2 * g * d) + n * d * h + 3 * h * f + 2 * h
    return m.num_layers * per_layer + 2 * m.vocab_size * h + m.patch_dim * h + h


def cpu_fit_problem(params: int, shard_divisor: int, nproc_per_node: int, preset: str | None) -> str | None:
    """Why a model of ``params`` parameters (split over TP x PP = ``shard_divisor``) cannot train in
    ``nproc_per_node`` CPU processes of this machine, or None when its training state fits in 80% of the RAM."""
    import psutil

    need_gib = TRAIN_BYTES_PER_PARAM * params / shard_divisor * nproc_per_node / 2**30
    have_gib = psutil.virtual_memory().total / 2**30
    if need_gib <= 0.8 * have_gib:
        return None
    the_model = f"--model {preset}" if preset else "the checkpoint's model"
    return (f"this machine has no GPU, and {the_model} ({params / 1e9:.1f}B parameters) needs about "
            f"{need_gib:.0f} GiB of training state for {nproc_per_node} CPU processes; it has {have_gib:.0f} "
            f"GiB of RAM: set PRESET=tiny for a CPU run")


def check_fits(cfg, nproc_per_node: int) -> None:
    """Refuse a run whose model cannot fit this machine (say how much it needs and what to change)."""
    import torch  # here, not at the top: `--help` answers without torch

    if not torch.cuda.is_available():
        problem = cpu_fit_problem(parameter_count(cfg.model.args), cfg.parallel.tensor * cfg.parallel.pipeline,
                                  nproc_per_node, cfg.model.preset)
        if problem:
            raise PreflightError(problem)
        return
    visible = torch.cuda.device_count()
    if visible < nproc_per_node:
        raise PreflightError(f"{nproc_per_node} processes per node were asked for but {visible} GPU(s) are "
                             f"visible: set GPUS_PER_NODE={visible} (or CUDA_VISIBLE_DEVICES)")


def no_cuda_driver() -> bool:
    """True when this machine has no CUDA driver library, so torch sees no GPU (``torch.cuda.is_available()``
    is False without it); False says nothing (torch is then asked, in :func:`check_fits`)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return True
    return False


def preset_shape(args) -> types.SimpleNamespace:
    """The shape fields :func:`parameter_count` reads of the model ``--model`` and the architecture flags build
    (``SoloModelArgs.from_preset`` without torch: its two defaults that a preset may leave out, vocabulary and
    patch size, are SOLO's; tests compare the counts for every preset)."""
    return types.SimpleNamespace(**{"vocab_size": SOLO_VOCAB_SIZE, "patch_dim": PATCH_DIM,
                                    **PRESETS[args.model or "tiny"], **run_plan.architecture_flags(args)})


def check_derived_before_imports(args, nproc_per_node: int, nnodes: int) -> None:
    """The checks of the run's derived sizes that need neither torch nor megatron-core, in the order the
    full checks make them: the world-size arithmetic (``run_plan.run_sizes``), the checkpoint a --finetune
    starts from (``run_plan.start_checkpoint``), a preset model that cannot fit a machine without a GPU, and
    every split the run reads having packs (``data.splits.check_split_packs``)."""
    # here: numpy (under the data checks) adds warning filters when imported, and importing this module changes
    # nothing
    from megatron_solo.data.splits import DataSplitError, check_split_packs
    from megatron_solo.training.early_checks import blend_prefixes

    if args.dry_run:  # the trainer plans instead (the launchers do not run the pre-flight for a dry run)
        return
    sizes = run_plan.run_sizes(args, world=nproc_per_node * nnodes)
    load_dir, _, _ = run_plan.start_checkpoint(args)
    if load_dir is None and no_cuda_driver():  # a new model of the preset's shape, on CPU processes
        problem = cpu_fit_problem(parameter_count(preset_shape(args)),
                                  args.tensor_model_parallel_size * args.pipeline_model_parallel_size,
                                  nproc_per_node, args.model or "tiny")
        if problem:
            raise PreflightError(problem)
    if not args.valid_data_path:
        try:
            check_split_packs(blend_prefixes(args.data_path), args.split,
                              valid_samples=args.eval_iters * sizes["global_batch_size"])
        except DataSplitError as e:
            raise PreflightError(str(e)) from None


def _with_launcher_names(msg: str, names: dict[str, str]) -> str:
    """Append which launcher variables set the flags the message names (``--split`` -> ``SPLIT``)."""
    found = []
    for flag in re.findall(r"--[a-z0-9][a-z0-9-]*", msg):
        var = names.get(flag.lstrip("-"))
        if var and var not in found:
            found.append(var)
    if "world size" in msg:  # torchrun's process count against TP x PP x CP
        found += [v for v in (names.get("tensor-model-parallel-size"), names.get("pipeline-model-parallel-size"),
                              names.get("nproc-per-node"), names.get("nnodes")) if v and v not in found]
    return f"{msg} (launcher: set {', '.join(found)})" if found and names else msg


def run(nproc_per_node: int, nnodes: int, train_argv: list[str], stages=("quick", "full")) -> None:
    """All pre-flight checks; a mistake raises a UserError (ArgumentError, InputError, PreflightError: one line).
    ``stages``: "quick", the checks that need neither torch nor megatron-core (a second at most); "full", the
    rest (they import both)."""
    parser = build_parser()

    def parser_error(message):  # argparse's own errors (a missing or malformed flag), as one line
        raise ArgumentError(message)

    parser.error = parser_error
    args = parser.parse_args(train_argv)
    if "quick" in stages:
        # here: numpy (under the data checks) adds warning filters when imported, and importing this module
        # changes nothing
        from megatron_solo.training.early_checks import check_before_imports

        check_before_imports(args)  # a bad flag, a missing tokenizer or data prefix: said before torch loads
        check_derived_before_imports(args, nproc_per_node, nnodes)  # sizes, --finetune, fit, splits: the same
    if "full" not in stages:
        return
    mcore_fixes.apply()  # megatron-core's workarounds, before it is imported (one of them must precede that)
    # Imported here, not at the top: they load torch and megatron-core (seconds), and the checks above need neither.
    from megatron_solo.data.dataset import DataSplitError, check_split_sizes
    from megatron_solo.training import config, faults

    os.environ["WORLD_SIZE"] = str(nproc_per_node * nnodes)  # torchrun's world: the config divides it by TP x PP x CP
    cfg = config.build_train_config(args)
    check_fits(cfg, nproc_per_node)
    faults.check_inputs(cfg)
    if not cfg.data.valid_data_path:
        try:
            check_split_sizes(list(cfg.data.data_path), cfg.data.split,
                              valid_samples=cfg.logging.eval_iters * cfg.schedule.global_batch_size)
        except DataSplitError as e:
            raise PreflightError(str(e)) from None


def main(argv=None, stages=("quick", "full")) -> int:
    """The pre-flight as a command: 0, or the exit code of the mistake after its one ``error:`` line."""
    quiet.filter_known_warnings()
    ap = argparse.ArgumentParser(
        prog="python -m megatron_solo.training.preflight",
        description="Check a training launch in one process before torchrun starts (examples/common.sh runs it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--nproc-per-node", type=int, default=1, help="torchrun's processes per node")
    ap.add_argument("--nnodes", type=int, default=1, help="torchrun's node count")
    ap.add_argument("--launcher-vars", default="",
                    help="'flag=VARIABLE ...': name these launcher variables in error lines")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the trainer's flags")
    args = ap.parse_args(argv)
    train_argv = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    names = dict(pair.split("=", 1) for pair in args.launcher_vars.split() if "=" in pair)
    try:
        run(args.nproc_per_node, args.nnodes, train_argv, stages)
    except errors.UserError as e:
        errors.print_error(_with_launcher_names(str(e), names))
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
