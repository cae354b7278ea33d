"""Pre-flight of a launch: every check a run makes at start-up, in one quick process, before torchrun.

``examples/common.sh`` runs ``python -m megatron_solo.training.preflight --nproc-per-node N --nnodes M
--launcher-vars "FLAG=VAR ..." -- <the trainer's flags>`` and starts torchrun only when it exits 0, so a
mistake is one ``error:`` line, printed once, naming the launcher variable to change, and no process
group, torchrun agent or traceback is ever started. ``--launcher-vars`` comes from the launchers' table of
variables (``LAUNCHER_VARS`` in common.sh, the one place a variable is tied to its flag; torchrun's
``nproc-per-node``/``nnodes`` included). The checks are the trainer's own, those that need no torch first
(:mod:`megatron_solo.training.early_checks`: a mistake there answers in about a second):

1. the flags and every decision derived from them (:func:`megatron_solo.training.config.build_train_config`:
   ``validate_args``, the sizes, the resume plan), with the world size torchrun would make;
2. whether the model fits the machine (:func:`check_fits`): no GPU and SOLO-7B is refused, naming
   ``PRESET=tiny``; on GPUs, fewer visible devices than processes per node is refused;
3. the inputs (tokenizer, data prefixes, checkpoint shape, ``--save`` writable: ``faults.check_inputs``);
4. that every split the run reads has packs (:func:`megatron_solo.data.dataset.check_split_sizes`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from megatron_solo import errors, mcore_fixes, quiet
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


def check_fits(cfg, nproc_per_node: int) -> None:
    """Refuse a run whose model cannot fit this machine (say how much it needs and what to change)."""
    import torch  # here, not at the top: `--help` answers without torch

    params = parameter_count(cfg.model.args)
    shard = params / (cfg.parallel.tensor * cfg.parallel.pipeline)
    need_gib = TRAIN_BYTES_PER_PARAM * shard * nproc_per_node / 2**30
    if not torch.cuda.is_available():
        import psutil

        have_gib = psutil.virtual_memory().total / 2**30
        if need_gib > 0.8 * have_gib:
            the_model = f"--model {cfg.model.preset}" if cfg.model.preset else "the checkpoint's model"
            raise PreflightError(
                f"this machine has no GPU, and {the_model} ({params / 1e9:.1f}B parameters) needs about "
                f"{need_gib:.0f} GiB of training state for {nproc_per_node} CPU processes; it has {have_gib:.0f} "
                f"GiB of RAM: set PRESET=tiny for a CPU run")
        return
    visible = torch.cuda.device_count()
    if visible < nproc_per_node:
        raise PreflightError(f"{nproc_per_node} processes per node were asked for but {visible} GPU(s) are "
                             f"visible: set GPUS_PER_NODE={visible} (or CUDA_VISIBLE_DEVICES)")


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
