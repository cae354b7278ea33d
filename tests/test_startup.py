"""Quick answers (issue 26.6): the launchers' pre-flight says a mistake in the run's derived sizes (world size,
global batch, a --finetune without a checkpoint, a preset too big for a machine without a GPU, an empty
validation split) before torch and megatron-core load, with the line the full checks say; and the plain
Python it does that with agrees with megatron-core's rule and SoloModelArgs."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_derived_mistakes_answer_before_torch_loads(digits_data, tmp_path):
    """In a fresh interpreter, through the pre-flight's entry point: each mistake's one line (the full checks'
    words, the launcher variable added) with neither torch nor megatron-core imported."""
    flags = ["--model", "tiny", "--seq-length", "128", "--train-iters", "2", "--data-path", digits_data["pretrain"],
             "--tokenizer-model", digits_data["tokenizer"], "--split", "100,0,0"]
    cases = {
        "tp": ["--tensor-model-parallel-size", "4"],
        "gbs": ["--micro-batch-size", "2", "--global-batch-size", "7"],
        "finetune": ["--load", str(tmp_path / "none"), "--finetune"],
        "fit": ["--model", "solo-7b"],
        "split": ["--split", "1000,1,0", "--eval-iters", "1"],
    }
    import psutil

    from megatron_solo.training.preflight import no_cuda_driver

    fit = no_cuda_driver() and psutil.virtual_memory().total * 0.8 < 244 * 2**30  # else that run would fit here
    if not fit:
        del cases["fit"]
    probe = ("import sys\n"
             "from megatron_solo.training import preflight\n"
             f"for name, extra in {cases!r}.items():\n"
             "    code = preflight.main(['--nproc-per-node', '2', '--launcher-vars', 'tensor-model-parallel-size=TP "
             "global-batch-size=GLOBAL_BATCH_SIZE finetune=INIT_CKPT model=PRESET split=SPLIT', '--', "
             f"*{flags!r}, *extra])\n"
             "    print('EXIT', name, code, file=sys.stderr)\n"
             "print('HEAVY', sorted(m for m in ('torch', 'megatron.core') if m in sys.modules), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    lines = r.stderr.splitlines()
    assert r.returncode == 0 and lines[-1] == "HEAVY []", r.stderr[-3000:]
    said = dict(zip(lines[1:-1:2], lines[0:-1:2]))
    assert said["EXIT tp 2"] == ("error: world size 2 is not divisible by TP(4) x PP(1) x CP(1) "
                                 "(launcher: set TP)")
    assert said["EXIT gbs 2"] == ("error: --global-batch-size 7 is not divisible by micro-batch-size (2) x "
                                  "data-parallel size (2) (launcher: set GLOBAL_BATCH_SIZE)")
    assert said["EXIT finetune 2"] == (f"error: --finetune: no complete checkpoint under {tmp_path / 'none'} "
                                       "(launcher: set INIT_CKPT)")
    if fit:  # 18 bytes x 7.3B parameters x 2 processes
        assert said["EXIT fit 2"].startswith("error: this machine has no GPU, and --model solo-7b (7.3B parameters) "
                                             "needs about 244 GiB of training state for 2 CPU processes")
        assert said["EXIT fit 2"].endswith("GiB of RAM: set PRESET=tiny for a CPU run (launcher: set PRESET)")
    assert said["EXIT split 2"].startswith(f"error: {digits_data['pretrain']}: the valid split of --split 1000,1,0 "
                                           "holds no packs")


@pytest.mark.parametrize("split", ["99,1,0", "969,30,1", "100,0,0", "98,2", "1000,1,0", "1,1,1", "0.7,0.2,0.1",
                                   "3", "90,5,5", "949,50,1"])
def test_split_rule_is_megatron_cores(split):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from megatron_solo.data.splits import split_bounds, split_pack_counts

    theirs = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    assert split_bounds(split) == theirs
    for n in (1, 2, 3, 7, 40, 99, 100, 101, 1000, 12345):
        assert split_pack_counts(n, split) == [None if m is None else int(round(m[1] * n)) - int(round(m[0] * n))
                                               for m in theirs]


def test_preset_sizes_without_torch_are_the_models():
    """The pre-flight's torch-free shape of a preset counts the parameters SoloModelArgs' does, overrides too."""
    from megatron_solo.model.config import PRESETS, SoloModelArgs
    from megatron_solo.training.arguments import build_parser
    from megatron_solo.training.preflight import parameter_count, preset_shape
    from megatron_solo.training.run_plan import architecture_flags

    for name in PRESETS:
        for extra in ([], ["--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "8"]):
            args = build_parser().parse_args(["--model", name, "--data-path", "x", "--train-iters", "1", "--seq-length", "128",
                                              *extra])
            model = SoloModelArgs.from_preset(name, **architecture_flags(args))
            assert parameter_count(preset_shape(args)) == parameter_count(model), (name, extra)
