"""Entry point of every training phase: ``torchrun ... -m megatron_solo.train --seq-length ... --data-path ...``.

Flags follow Megatron-LM (``python -m megatron_solo.train --help``); see docs/TRAINING.md.
"""

import sys

if __name__ == "__main__":  # the checkpoint writer spawns helpers: the guard keeps them from re-running this
    from megatron_solo import quiet
    from megatron_solo.training.arguments import build_parser

    quiet.filter_known_warnings()  # before megatron-core is imported: its import-time warnings say nothing
    build_parser().parse_known_args()  # --help answers here, before torch and megatron-core load
    from megatron_solo.training.loop import main

    sys.exit(main())
