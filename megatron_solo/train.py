"""Entry point of every training phase: ``torchrun ... -m megatron_solo.train --seq-length ... --data-path ...``.

Flags follow Megatron-LM (``python -m megatron_solo.train --help``); see docs/TRAINING.md. :func:`main` turns
the flags into the run's :class:`~megatron_solo.training.config.TrainConfig` (a bad flag: one ``error:``
line, exit 2), then plans (``--dry-run``) or trains (:class:`~megatron_solo.training.trainer.Trainer`).
"""

import sys

from megatron_solo import quiet
from megatron_solo.errors import entry_point, global_rank
from megatron_solo.training.arguments import build_parser


@entry_point  # a user error from here on (a bad flag, an input, a fault of the run): one error: line, its exit code
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # here: numpy (under the data checks) adds warning filters when imported, and importing this module changes
    # nothing
    from megatron_solo.training.early_checks import check_before_imports

    check_before_imports(args)  # a bad flag, a missing tokenizer or data prefix: said before torch loads
    # Imported here, not at the top: --help and the checks above answer before torch and megatron-core load.
    from megatron_solo import cpu_backend, mcore_fixes, parallel

    mcore_fixes.apply()  # megatron-core's workarounds, before it is imported (one of them must precede that)
    # Imported here, after the workarounds: these import megatron-core.
    from megatron_solo.training import faults
    from megatron_solo.training.config import build_train_config
    from megatron_solo.training.dry_run import run_dry_run
    from megatron_solo.training.trainer import Trainer

    faults.watch_parent()  # a torchrun worker exits (no save) when its agent dies
    cfg = build_train_config(args)  # a bad flag: ArgumentError, before anything is built
    if cfg.dry_run.enabled:  # plan only: no data, no GPU, no process group
        return run_dry_run(cfg)
    if cfg.resume.nothing_to_do:  # a finished run relaunched: said once, nothing built, loaded or saved
        if global_rank() == 0:
            print(cfg.resume.nothing_to_do, flush=True)
        return 0
    with faults.guarded_run(cfg) as vocab:  # inputs checked, --save locked by rank 0 for the run's life
        cpu_backend.ensure()  # megatron-core on CPU/gloo when CUDA is absent (a no-op otherwise)
        trainer = Trainer(cfg, vocab)
        summary = trainer.train()
        trainer.close()
        parallel.destroy()
    return 2 if summary["exit_reason"] == "nan" else 0


if __name__ == "__main__":  # the checkpoint writer spawns helpers: the guard keeps them from re-running this
    quiet.filter_known_warnings()  # before megatron-core is imported: its import-time warnings say nothing
    build_parser().parse_known_args()  # --help answers here, before torch and megatron-core load
    sys.exit(main())
