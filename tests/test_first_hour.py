"""A new user's first hour, through the commands they type: every launcher explains itself (--help), and
each usual mistake ends in one `error:` line that names what to change, exit code 2, no traceback and no
torchrun (the launchers' pre-flight check runs before torchrun starts). Tools answer --help without
loading torch; the messages that must never be silent (a changed global batch size, an older checkpoint
picked for conversion) are said."""

import json
import os
import subprocess
import sys

import pytest

from megatron_solo.netutil import free_port
from tests.conftest import ROOT, run_tool

PY = sys.executable
LAUNCHERS = ["stage0_align.sh", "stage1_pretrain.sh", "stage2_pretrain.sh", "stage3_anneal.sh", "sft.sh"]


def _launch(script, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PRESET", "INIT_CKPT")}
    env.update(PYTHON=PY, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", **env_vars)
    return subprocess.run(["bash", f"examples/{script}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(r) -> str:
    """The whole terminal output is one `error:` line; exit 2; torchrun never ran."""
    terminal = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-4000:]
    assert len(terminal) == 1 and terminal[0].startswith("error: "), "\n".join(terminal[-40:])
    assert "Traceback" not in r.stderr and "torch.distributed" not in r.stderr and "== " not in r.stderr
    return terminal[0]


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_help_lists_phase_variables_and_an_example(script):
    r = subprocess.run(["bash", f"examples/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=30, env=dict(os.environ, PRESET="tiny"))
    assert r.returncode == 0 and r.stderr == ""
    out = r.stdout
    assert "Example" in out and f"bash examples/{script}" in out
    for var, flag in (("DATA_PATH", "--data-path"), ("TP=2", "--tensor-model-parallel-size"),
                      ("SPLIT=99,1,0", "--split"), ("GLOBAL_BATCH_SIZE=8", "--global-batch-size"),
                      ("PRESET=tiny", "--model")):
        line = next(l for l in out.split("\nVariables")[1].splitlines()[2:] if var in l)
        assert flag in line, line
    assert "Checkpoints:" in out and "--load --finetune" in out


@pytest.mark.parametrize("script", ["quickstart.sh", "slurm_submit.sh"])
def test_other_scripts_answer_help_without_running(script):
    r = subprocess.run(["bash", f"examples/{script}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "" and f"examples/{script}" in r.stdout


@pytest.fixture(scope="module")
def small_prefix(digits_data, tmp_path_factory):
    """A user's own few-dozen-document dataset: 40 digits, 3 packs of 128 tokens."""
    root = tmp_path_factory.mktemp("small")
    corpus = os.path.join(digits_data["root"], "corpus")
    with open(os.path.join(corpus, "pretrain.jsonl")) as f:
        (root / "small.jsonl").write_text("".join(f.readlines()[:40]))
    prefix = str(root / "small")
    run_tool(["tools/preprocess_data.py", "--input", str(root / "small.jsonl"), "--output-prefix", prefix,
              "--tokenizer-model", digits_data["tokenizer"], "--format", "pretrain", "--seq-length", "128",
              "--image-root", corpus, "--no-progress"])
    return prefix


def test_mistakes_through_the_launchers_are_one_line_before_torchrun(digits_data, small_prefix, tmp_path):
    base = dict(DATA_PATH=digits_data["pretrain"], TOKENIZER_MODEL=digits_data["tokenizer"], TRAIN_ITERS="2",
                STAGE1_CKPT=str(tmp_path / "s1"), STAGE3_CKPT=str(tmp_path / "no_stage3"),
                SFT_CKPT=str(tmp_path / "sft"))
    # 1. No PRESET=tiny on a machine without a GPU: SOLO-7B would start 8 processes and be OOM-killed.
    line = _one_error_line(_launch("stage1_pretrain.sh", **base))
    assert "no GPU" in line and "PRESET=tiny" in line
    # 2. A few dozen documents with the default SPLIT=99,1,0: the validation split is empty.
    line = _one_error_line(_launch("stage1_pretrain.sh", **dict(base, PRESET="tiny", DATA_PATH=small_prefix)))
    assert "valid split" in line and "3 packs" in line and "--split 100,0,0" in line
    assert "SPLIT" in line.split("launcher:")[1] and "VALID_DATA_PATH" in line
    # 3. A parallel layout the process count cannot make.
    line = _one_error_line(_launch("stage1_pretrain.sh", **dict(base, PRESET="tiny", TP="4")))
    assert "world size 2 is not divisible by TP(4)" in line and "set TP" in line
    # 4. SFT without a checkpoint to start from names the launcher variable.
    line = _one_error_line(_launch("sft.sh", **dict(base, PRESET="tiny", DATA_PATH=digits_data["sft"])))
    assert "--finetune" in line and "no_stage3" in line and "INIT_CKPT" in line
    # 5. A required variable left out.
    line = _one_error_line(_launch("stage2_pretrain.sh", **{k: v for k, v in base.items() if k != "DATA_PATH"},
                                   PRESET="tiny"))
    assert line.startswith("error: set DATA_PATH")


def test_a_launcher_plans_its_full_scale_recipe_through_the_variable_table():
    """DRY_RUN=1 (one process, no data): stage 0's recipe arrays reach the trainer as SOLO-7B's recipe
    (seq 32768, global batch 128, bf16, distributed optimizer, TP 2, the LLM frozen), and the table's rows
    apply: GPUS_PER_NODE sets torchrun's world size, RECOMPUTE_ARGS set empty takes the recipe's
    --recompute-* flags out."""
    r = _launch("stage0_align.sh", DRY_RUN="1", GPUS_PER_NODE="4", RECOMPUTE_ARGS="")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    plan = r.stdout
    assert "dry run: world 4 = TP 2 x PP 1 x DP 2, distributed optimizer, bfloat16 weights\n" in plan, plan[:2000]
    assert "batch: micro 1 x seq 32768, global 128 (64 micro-batches per DP rank)" in plan
    assert "(12,582,912 trained)" in plan  # --freeze-lm: the patch embedding 3072 x 4096 only


TOOLS = sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py"))


@pytest.mark.parametrize("entry", [["-m", "megatron_solo.train"], ["-m", "megatron_solo.training.preflight"]]
                         + [[f"tools/{t}"] for t in TOOLS], ids=lambda e: e[-1])
def test_help_answers_without_loading_torch(entry):
    """--help is instant: it is printed before torch, megatron-core or transformers are imported."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{entry[-1]!r}, '--help']\n"
             "try:\n"
             f"    runpy.run_{'module' if entry[0] == '-m' else 'path'}({entry[-1]!r}, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    assert e.code in (0, None), e.code\n"
             "heavy = sorted(m for m in ('torch', 'megatron.core', 'transformers') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    r = subprocess.run([PY, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage:" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "HEAVY []", r.stdout[-500:]
    assert "Warning" not in r.stderr, r.stderr[-2000:]


def _fake_complete_checkpoint(root, iteration, gbs):
    """A checkpoint directory as far as the start-up decisions read it (solo_checkpoint.json, tracker)."""
    from megatron_solo.model import SoloModelArgs

    d = root / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    info = {"iteration": iteration, "consumed_train_samples": iteration * gbs, "padded_vocab_size": 33280,
            "model_args": SoloModelArgs.from_preset("tiny").to_dict(), "args": {"global_batch_size": gbs},
            "layout": {"tp": 1, "pp": 1}}
    (d / "solo_checkpoint.json").write_text(json.dumps(info))
    (d / "metadata.json").write_text("{}")  # dist_checkpointing's marker (checkpoint.is_complete reads both)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def test_resume_with_another_global_batch_size_says_so(tmp_path, monkeypatch):
    from megatron_solo.training.arguments import build_parser
    from megatron_solo.training.config import build_train_config

    _fake_complete_checkpoint(tmp_path / "ck", 2, gbs=8)
    monkeypatch.setenv("WORLD_SIZE", "1")
    flags = ["--model", "tiny", "--seq-length", "128", "--train-iters", "4", "--data-path", "x",
             "--load", str(tmp_path / "ck")]
    same = build_train_config(build_parser().parse_args(flags + ["--global-batch-size", "8"]))
    assert same.resume.note is None
    other = build_train_config(build_parser().parse_args(flags + ["--global-batch-size", "4"]))
    assert "global batch size changes from 8 (checkpoint) to 4" in other.resume.note


def test_conversion_says_when_it_picks_an_older_iteration(tmp_path, capsys):
    from megatron_solo.convert.megatron_io import read_checkpoint

    _fake_complete_checkpoint(tmp_path / "ck", 2, gbs=8)
    (tmp_path / "ck" / "iter_0000005").mkdir()  # an interrupted save: no solo_checkpoint.json
    assert read_checkpoint(str(tmp_path / "ck"))["iteration"] == 2
    err = capsys.readouterr().err
    assert "converting iteration 2" in err and "iter_0000005 is incomplete" in err


def test_warning_filters_are_installed_by_entry_points_not_by_imports():
    probe = ("import logging, warnings\n"
             "before = list(warnings.filters)\n"
             "import megatron_solo.quiet as quiet, megatron_solo.training.preflight, megatron_solo.train\n"
             "assert warnings.filters == before, 'importing changed the warning filters'\n"
             "assert not logging.getLogger('megatron.core.models.gpt.gpt_model').filters\n"
             "quiet.filter_known_warnings()\n"
             "assert len(warnings.filters) > len(before)\n"
             "assert logging.getLogger('megatron.core.models.gpt.gpt_model').filters\n"
             "warnings.warn('a warning of the user', UserWarning)\n")  # others still show
    r = subprocess.run([PY, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "a warning of the user" in r.stderr
