"""The first hour, round 2 (issue 26): a resumed run's learning-rate schedule follows Megatron-LM's
--override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler, said once; a combination that
cannot be honoured is one `error:` line naming both ways out (the multi-process half, TP=2 with the
distributed optimizer and a new --lr each way, shares the resume run of tests/test_training.py). A relaunch
into a directory holding a run says what the flags change, and a finished run has nothing to do."""

import contextlib
import json
import logging
import os
import subprocess
import sys
import pytest

from megatron_solo import train
from megatron_solo.training.arguments import ArgumentError, build_parser
from megatron_solo.training.config import build_train_config
from tests.conftest import ROOT
from tests.test_first_hour import _fake_complete_checkpoint, _launch, _one_error_line

SAVED_SCHEDULE = {"lr": 2e-3, "min_lr": 2e-4, "lr_decay_style": "cosine", "lr_warmup_iters": 1, "lr_warmup_init": 0.0,
                  "lr_decay_iters": None, "weight_decay": 0.1, "train_iters": 6, "global_batch_size": 8,
                  "data_path": ["x"], "model": "tiny", "seq_length": 128, "micro_batch_size": 1, "loss_role": "assistant"}
FLAGS = ["--model", "tiny", "--seq-length", "128", "--train-iters", "6", "--global-batch-size", "8",
         "--data-path", "x", "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "1", "--weight-decay", "0.1"]


@pytest.fixture
def recorded_run(tmp_path, monkeypatch):
    """A checkpoint whose recorded arguments hold the schedule of FLAGS (iteration 2)."""
    root = tmp_path / "ck"
    _fake_complete_checkpoint(root, 2, gbs=8)
    info_path = root / "iter_0000002" / "solo_checkpoint.json"
    info = json.loads(info_path.read_text())
    info["args"] = SAVED_SCHEDULE
    info_path.write_text(json.dumps(info))
    monkeypatch.setenv("WORLD_SIZE", "1")
    return str(root)


def _cfg(*flags):
    return build_train_config(build_parser().parse_args([*FLAGS, *flags]))


def test_resume_keeps_the_checkpoint_schedule_unless_the_flags_override_it(recorded_run):
    same = _cfg("--load", recorded_run)
    assert (same.resume.schedule_from, same.resume.note, same.optimizer.lr) == ("checkpoint", None, 2e-3)

    kept = _cfg("--load", recorded_run, "--lr", "5e-4", "--train-iters", "10")
    assert kept.resume.note == ("learning-rate schedule: the checkpoint's (--lr 0.002 --lr-decay-iters 6), not the "
                                "flags' (--lr 0.0005 --lr-decay-iters 10): add --override-opt_param-scheduler to use "
                                "the flags'")
    assert (kept.optimizer.lr, kept.optimizer.lr_decay_iters, kept.schedule.train_iters) == (2e-3, 6, 10)
    explicit = _cfg("--load", recorded_run, "--lr", "5e-4", "--use-checkpoint-opt_param-scheduler")
    assert explicit.resume.note == "learning-rate schedule: the checkpoint's (--lr 0.002), not the flags' (--lr 0.0005)"
    assert explicit.optimizer.lr == 2e-3

    new = _cfg("--load", recorded_run, "--lr", "5e-4", "--override-opt-param-scheduler")  # either spelling
    assert new.resume.note == ("learning-rate schedule: the flags' (--lr 0.0005) replaces the checkpoint's "
                               "(--lr 0.002) (--override-opt_param-scheduler); the iteration count carries over")
    assert (new.resume.schedule_from, new.optimizer.lr) == ("flags", 5e-4)


def test_a_schedule_that_cannot_be_kept_is_one_line_naming_the_ways_out(recorded_run, tmp_path):
    with pytest.raises(ArgumentError) as e:
        _cfg("--load", recorded_run, "--finetune", "--use-checkpoint-opt_param-scheduler")
    assert str(e.value) == ("--use-checkpoint-opt_param-scheduler keeps a checkpoint's learning-rate schedule, but "
                            "--finetune starts a new one: drop --use-checkpoint-opt_param-scheduler (the flags' "
                            "schedule) or drop --finetune (resume the checkpoint's run)")
    converted = tmp_path / "converted"
    _fake_complete_checkpoint(converted, 0, gbs=8)  # recorded arguments without a schedule
    with pytest.raises(ArgumentError) as e:
        _cfg("--load", str(converted), "--use-checkpoint-opt_param-scheduler")
    assert str(e.value) == (f"--use-checkpoint-opt_param-scheduler: {converted} records no learning-rate schedule "
                            f"(a converted checkpoint); drop the flag to use the flags' schedule")
    assert _cfg("--load", str(converted)).resume.schedule_from == "flags"

    # Both flags: an ArgumentError, which the trainer's entry point prints as one line with exit 2 (the path
    # test_training.test_bad_flags_exit_2_with_a_single_stderr_line runs as a command).
    with pytest.raises(ArgumentError) as e:
        _cfg("--load", recorded_run, "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler")
    assert str(e.value) == ("--override-opt_param-scheduler (the flags' learning-rate schedule) and "
                            "--use-checkpoint-opt_param-scheduler (the checkpoint's) contradict each other: give "
                            "one of them")


def test_a_resume_says_which_recorded_arguments_the_flags_change(recorded_run):
    same = _cfg("--load", recorded_run, "--micro-batch-size", "1")
    assert same.resume.note is None
    other = _cfg("--load", recorded_run, "--data-path", "y", "z", "--seq-length", "64", "--global-batch-size", "4")
    assert other.resume.note == (
        f"resuming the run in {recorded_run} at iteration 2 with arguments other than it recorded: --data-path y z "
        f"(checkpoint: x); --seq-length 64 (checkpoint: 128); the global batch size changes from 8 (checkpoint) to "
        f"4: the iteration count and consumed samples carry over, the learning-rate schedule continues by "
        f"iteration, and each step from here takes 4 samples")


def test_a_finished_run_relaunched_has_nothing_to_do_and_saves_nothing(tmp_path, monkeypatch, capsys, digits_data):
    root = tmp_path / "ck"
    _fake_complete_checkpoint(root, 6, gbs=8)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    flags = [*FLAGS, "--data-path", digits_data["pretrain"]]  # the data is there (the early checks look)
    assert train.main([*flags, "--save", str(root), "--load", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"nothing to do: {root} already holds iteration 6 and --train-iters is 6; raise --train-iters to train on "
        f"(nothing was saved)"]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*")) == before


def test_launcher_mistakes_name_the_file_and_the_variable(tmp_path, digits_data):
    """Each: the whole output one `error:` line, exit 2, no traceback, before torchrun (the launcher's pre-flight)."""
    base = dict(DATA_PATH=digits_data["pretrain"], TRAIN_ITERS="2", TOKENIZER_MODEL=os.path.join(ROOT, "README.md"))
    line = _one_error_line(_launch("stage1_pretrain.sh", **base, PRESET="small"))
    assert line == ("error: --model small: unknown preset; choose one of llama3.1-8b, qwen2.5-7b, qwen3-1.7b, "
                    "qwen3-8b, solo-7b, tiny (launcher: set PRESET)")
    base_dir = tmp_path / "Qwen3-base"
    base_dir.mkdir()
    (base_dir / "tokenizer.json").write_text("{}")
    line = _one_error_line(_launch("stage1_pretrain.sh", **dict(base, TOKENIZER_MODEL=str(base_dir)), PRESET="tiny"))
    assert line == (f"error: --tokenizer-model {base_dir} is a directory; pass the tokenizer file in it: "
                    f"{base_dir / 'tokenizer.json'} (launcher: set TOKENIZER_MODEL)")


def test_a_plan_that_does_not_fit_warns_with_the_alternatives_and_needs_no_data(monkeypatch):
    from megatron_solo.training.dry_run import GIB, fit_advice, plan

    monkeypatch.setenv("WORLD_SIZE", "8")
    recipe = ["--model", "solo-7b", "--seq-length", "4096", "--global-batch-size", "64", "--bf16"]
    with pytest.raises(ArgumentError, match="^the following arguments are required: --data-path$"):
        build_train_config(build_parser().parse_args(recipe + ["--train-iters", "1"]))
    cfg = build_train_config(build_parser().parse_args(recipe + ["--dry-run"]))  # no --data-path, no --train-iters
    lines = fit_advice(cfg, plan(cfg))
    assert lines[0] == ("warning: the busiest rank needs 139.3 GiB, more than the 80 GB (74.5 GiB) of one H100; "
                        "alternatives (same world size 8):")
    # Each alternative's figure is the plan of that recipe (the reference: the same flags given directly).
    distopt = plan(build_train_config(build_parser().parse_args(recipe + ["--dry-run", "--use-distributed-optimizer"])))
    need = max(s["memory_bytes"]["total"] for s in distopt["stages"])
    assert f"  --use-distributed-optimizer: {need / GIB:.1f} GiB per rank, fits" in lines
    assert [line.split(":")[0] for line in lines[1:]] == [
        "  --recompute-granularity full", "  --use-distributed-optimizer", "  --tensor-model-parallel-size 2 (TP=2)",
        "  --pipeline-model-parallel-size 2 (PP=2)", "  --recompute-granularity full --use-distributed-optimizer"]
    assert fit_advice(build_train_config(build_parser().parse_args(
        recipe + ["--dry-run", "--dry-run-gpu", "B200"])), plan(cfg)) == []  # 139 GiB fits a 192 GB card


def test_the_known_third_party_lines_are_filtered_by_their_exact_text(capsys):
    """The emitters themselves: torch's positional-arguments check and megatron-core's blend logger."""
    import warnings

    from torch.distributed.checkpoint.utils import _api_bc_check

    from megatron_solo import quiet

    @_api_bc_check
    def load(state_dict, *, storage_reader=None):  # the name and keyword torch's check expects
        return state_dict

    blend_log = logging.getLogger("megatron.core.datasets.blended_dataset")
    said = "Cannot save the BlendedDataset indexes because path_to_cache is None"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.filter_known_warnings()
        load({}, None)
        warnings.warn("The argument order of save has been changed", UserWarning)  # another text still shows
    assert [str(w.message) for w in seen] == ["The argument order of save has been changed"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    blend_log.addHandler(handler)
    try:
        blend_log.warning(said)
        blend_log.warning("another blend warning")
    finally:
        blend_log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["another blend warning"]


# --------------------------------------------------------------------- the data side's messages (issue 26.3)
def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_data_path_that_names_no_dataset_says_what_to_give(digits_data, monkeypatch, capsys):
    """The launchers' pre-flight, in process, once per mistake: the exact line, exit 2, nothing else printed."""
    from megatron_solo.training import preflight

    data = os.path.dirname(digits_data["pretrain"])  # holds the prefixes pretrain and sft
    monkeypatch.setenv("WORLD_SIZE", "1")  # the pre-flight sets torchrun's world; restored after the test
    cases = [
        (f"{data}/pretrain-tokens.bin", f"--data-path {data}/pretrain-tokens.bin is one file of the dataset "
                                        f"{data}/pretrain; give the prefix: drop '-tokens.bin' (--data-path {data}/pretrain)"),
        (f"{data}/pretrian", f"--data-path {data}/pretrian: no dataset has this prefix (no pretrian-tokens.idx in "
                             f"{data}); did you mean {data}/pretrain?"),
        (f"{data}/cc3m", f"--data-path {data}/cc3m: no dataset has this prefix (no cc3m-tokens.idx in {data}); the "
                         f"prefixes there are pretrain, sft; or write it with tools/preprocess_data.py --output-prefix "
                         f"{data}/cc3m"),
        (data, f"--data-path {data} is a directory; give a dataset prefix in it ({data}/pretrain, {data}/sft)"),
        (f"{data}/cc3m.shards", f"--data-path: shard list {data}/cc3m.shards does not exist (is the sharded "
                                f"preprocessing finished?)"),
    ]
    for data_path, said in cases:
        code = preflight.main(["--launcher-vars", "data-path=DATA_PATH tokenizer-model=TOKENIZER_MODEL", "--",
                               "--model", "tiny", "--seq-length", "128", "--train-iters", "2", "--data-path", data_path,
                               "--tokenizer-model", digits_data["tokenizer"]])
        out = capsys.readouterr()
        assert (code, out.out, out.err) == (2, "", f"error: {said} (launcher: set DATA_PATH)\n")


def _records_with_images(digits_data, tmp_path, n):
    """The first n records of the demo's pretraining corpus and their images, copied under tmp_path."""
    import shutil

    corpus = os.path.join(digits_data["root"], "corpus")
    with open(os.path.join(corpus, "pretrain.jsonl")) as f:
        lines = f.readlines()[:n]
    (tmp_path / "images").mkdir()
    for line in lines:
        rel = json.loads(line)["messages"][0]["content"][0]["image_url"]["url"]
        shutil.copy(os.path.join(corpus, rel), tmp_path / rel)
    (tmp_path / "records.jsonl").write_text("".join(lines))
    return str(tmp_path / "records.jsonl"), [json.loads(l)["messages"][0]["content"][0]["image_url"]["url"]
                                             for l in lines]


def test_preprocessing_without_image_root_says_so_once(digits_data, tmp_path, capsys, caplog):
    """Relative image paths and no --image-root: every record is skipped; three warnings, not one per record,
    and the error line names the first record, its path and the flag to add."""
    records, images = _records_with_images(digits_data, tmp_path, 12)
    argv = ["--input", records, "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
            digits_data["tokenizer"], "--seq-length", "128", "--no-progress"]
    with caplog.at_level("WARNING", logger="megatron_solo.preprocess"):
        assert _tool("preprocess_data").main(argv) == 1  # run from the repository root: no images/ there
    err = capsys.readouterr().err
    assert err == (f'error: 12 of 12 records skipped (100.00% > --max-error-rate 1.00%); by reason: '
                   f'{{"missing_image_file": 12}}; the first: {records}:1: missing_image_file ({images[0]}): relative '
                   f'image paths are read from the current directory; pass --image-root, the directory they start '
                   f'from; no prefix written\n')
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and warned[-1].endswith("(further skips for this reason are counted, not shown)")
    assert not any(f.name.startswith("out") for f in tmp_path.iterdir())


def test_an_undecodable_image_is_named_by_its_file(digits_data, tmp_path, capsys, caplog):
    records, images = _records_with_images(digits_data, tmp_path, 4)
    (tmp_path / images[2]).write_bytes(b"<html>not found</html>")
    argv = ["--input", records, "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
            digits_data["tokenizer"], "--seq-length", "128", "--no-progress", "--image-root", str(tmp_path)]
    for storage in ("encoded", "patches"):  # each storage decodes on its own path
        with caplog.at_level("WARNING", logger="megatron_solo.preprocess"):
            assert _tool("preprocess_data").main(argv + ["--image-storage", storage]) == 1
        said = f"corrupt_image ({tmp_path / images[2]}: not an image format PIL reads (22 bytes))"
        assert capsys.readouterr().err == (f'error: 1 of 4 records skipped (25.00% > --max-error-rate 1.00%); by '
                                           f'reason: {{"corrupt_image": 1}}; the first: {records}:3: {said}; no prefix '
                                           f'written\n')
        assert [r.getMessage() for r in caplog.records] == [f"skip {records}:3: {said}"]
        caplog.clear()


# ------------------------------------------------------------------------ tools/generate.py (issue 26.5)
@pytest.fixture(scope="module")
def export_and_images(tmp_path_factory, digits_data):
    import shutil

    import torch

    from tests.helpers_convert import make_random_solo

    root = tmp_path_factory.mktemp("generate")
    hf = make_random_solo(str(root / "hf"), dtype=torch.float32)
    for i in (1, 2):
        shutil.copy(os.path.join(digits_data["root"], "corpus", "images", f"digit_000{i}.png"), root / f"d{i}.png")
    (root / "cut.png").write_bytes((root / "d1.png").read_bytes()[:60])  # a truncated download
    return root, hf


def test_generate_mistakes_are_one_line_before_torch_loads(export_and_images):
    """Each mistake: the exact line, exit 2, and neither torch nor transformers imported (a quick answer)."""
    root, hf = export_and_images
    (root / "bad.jsonl").write_text('{"prompt": "Which digit?", "image": "d1.png"}\n{"prompt": "x", "image": "gone.png"}\n')
    cases = [
        (["--image", str(root / "gone.png"), "--prompt", "x"], f"--image {root}/gone.png does not exist; give an image file"),
        (["--image", str(root / "cut.png"), "--prompt", "x"],
         f"--image {root}/cut.png is not an image that can be read (corrupt_image: OSError: image file is truncated); "
         "give an intact image file"),
        (["--input", str(root / "bad.jsonl"), "--image-root", str(root)],
         f"{root}/bad.jsonl:2: image {root}/gone.png does not exist; give an image file"),
    ]
    probe = ("import importlib.util, sys\n"
             "spec = importlib.util.spec_from_file_location('generate', 'tools/generate.py')\n"
             "gen = importlib.util.module_from_spec(spec); spec.loader.exec_module(gen)\n"
             f"for argv in {[['--hf-dir', hf, *argv] for argv, _ in cases]!r}:\n"
             "    print('EXIT', gen.main(argv), file=sys.stderr)\n"
             "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    expected = [line for _, said in cases for line in (f"error: {said}", "EXIT 2")] + ["HEAVY []"]
    assert (r.returncode, r.stdout, r.stderr.splitlines()) == (0, "", expected), r.stderr[-3000:]


def test_generate_answers_a_jsonl_as_each_question_alone(export_and_images, capsys):
    """The batch's answers are the answers each question gets alone (--prompt/--image: the reference)."""
    root, hf = export_and_images
    gen = _tool("generate")
    records = [{"prompt": "Which digit?", "image": "d1.png", "id": 7}, {"prompt": "Say a number."},
               {"prompt": "And this one?", "image": str(root / "d2.png")}]
    (root / "q.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    common = ["--hf-dir", hf, "--max-new-tokens", "3"]
    assert gen.main(common + ["--input", str(root / "q.jsonl"), "--image-root", str(root),
                              "--output", str(root / "a.jsonl")]) == 0
    answers = [json.loads(line) for line in (root / "a.jsonl").read_text().splitlines()]
    assert "3 of 3 answers reached --max-new-tokens 3" in capsys.readouterr().err  # a random model never stops
    assert [{k: v for k, v in a.items() if k not in ("answer", "stopped")} for a in answers] == records
    for rec, got in zip(records, answers):
        image = ["--image", os.path.join(root, rec["image"])] if "image" in rec else []
        assert gen.main(common + ["--prompt", rec["prompt"], *image]) == 0
        assert capsys.readouterr().out == got["answer"] + "\n" and got["stopped"] is False
    assert len({a["answer"] for a in answers}) == 3  # the images and prompts reached the model


# ------------------------------------------------------------------ quick answers (issue 26.6)
def test_early_checks_read_the_data_path_as_the_dataset_builder_does(digits_data, tmp_path):
    """blend_prefixes (no megatron-core) against parse_data_path (megatron-core's get_blend_from_list)."""
    from megatron_solo.data.dataset import parse_data_path
    from megatron_solo.training.early_checks import blend_prefixes

    a, b = digits_data["pretrain"], digits_data["sft"]
    shard_list = tmp_path / "set.shards"
    shard_list.write_text(f"{a}\n{b}\n")
    for words in ([a], [a, b], [f"{a} {b}"], ["0.3", a, "0.7", b], [f"1 {a} 2 {b}"], ["1e-1", a, "2", b],
                  [a, "2", b], [str(shard_list)], ["1", str(shard_list), "1", a],
                  [os.path.join(os.path.dirname(a), "*")]):
        assert blend_prefixes(words) == parse_data_path(words)[0], words


def test_a_launch_mistake_answers_before_torch_loads(digits_data):
    """The pre-flight and the trainer themselves, in a fresh interpreter: a mistyped prefix is said with
    neither torch nor megatron-core imported (the ~5 s they take is what made such answers slow)."""
    data = os.path.dirname(digits_data["pretrain"])
    flags = ["--model", "tiny", "--seq-length", "128", "--train-iters", "2", "--data-path", f"{data}/pretrian",
             "--tokenizer-model", digits_data["tokenizer"]]
    probe = ("import sys\n"
             "from megatron_solo import train\n"
             "from megatron_solo.training import preflight\n"
             f"print('EXIT', preflight.main(['--launcher-vars', 'data-path=DATA_PATH', '--', *{flags!r}]), file=sys.stderr)\n"
             f"print('EXIT', train.main({flags!r}), file=sys.stderr)\n"
             "print('HEAVY', sorted(m for m in ('torch', 'megatron.core', 'transformers') if m in sys.modules), "
             "file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    said = f"error: --data-path {data}/pretrian: no dataset has this prefix (no pretrian-tokens.idx in {data}); did you mean {data}/pretrain?"
    assert (r.returncode, r.stderr.splitlines()) == (0, [f"{said} (launcher: set DATA_PATH)", "EXIT 2", said, "EXIT 2",
                                                         "HEAVY []"]), r.stderr[-3000:]


# -------------------------------------------------------------- docs that stand alone (issue 26.8)
def test_inspect_and_visualize_name_the_pack_alike(digits_data, tmp_path, capsys):
    """Both tools take --pack (--index, inspect_data's former name, still read) and say a missing prefix and a
    pack out of range in the same words."""
    from megatron_solo.data.indexed import SoloIndexedDataset

    inspect, visualize = _tool("inspect_data"), _tool("visualize_patches")
    p, png = digits_data["pretrain"], str(tmp_path / "pack.png")
    assert inspect.main(["--prefix", p, "--pack", "1", "--json"]) == 0
    by_pack = json.loads(capsys.readouterr().out)
    assert inspect.main(["--prefix", p, "--index", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_pack and by_pack["pack"] == 1
    assert visualize.main(["--prefix", p, "--index", "1", "--tokenizer-model", digits_data["tokenizer"], "--out", png]) == 0
    assert "--- document 0" in capsys.readouterr().out and os.path.getsize(png) > 0
    n = len(SoloIndexedDataset(p))
    for tool, extra in ((inspect, ["--json"]), (visualize, ["--tokenizer-model", digits_data["tokenizer"], "--out", png])):
        assert tool.main(["--prefix", p, "--pack", str(n), *extra]) == 2
        assert capsys.readouterr().err == f"error: --pack {n} is out of range: {p} holds {n} packs (0 .. {n - 1})\n"
        assert tool.main(["--prefix", p + "-tokens.bin", *extra]) == 2
        assert capsys.readouterr().err == (f"error: --prefix {p}-tokens.bin is one file of the dataset {p}; give the "
                                           f"prefix: drop '-tokens.bin' (--prefix {p})\n")


def test_inspect_and_visualize_answer_without_torch(digits_data, tmp_path):
    """Issue 26.6: both inspection tools in a fresh interpreter show a pack with neither torch nor megatron-core
    imported (numpy's reader, data/index_file.py; the ~5-8 s those imports take was the tools' whole wait), and
    inspect_data's loss mask is still the training one: the trainer's build_sample on the same pack."""
    p, tok, png = digits_data["sft"], digits_data["tokenizer"], str(tmp_path / "pack.png")
    probe = ("import json, sys, runpy\n"
             "def run(tool, *args):\n"
             "    sys.argv = [tool, *args]\n"
             "    try:\n"
             "        runpy.run_path(tool, run_name='__main__')\n"
             "    except SystemExit as e:\n"
             "        print('EXIT', e.code, file=sys.stderr)\n"
             f"run('tools/inspect_data.py', '--prefix', {p!r}, '--pack', '1', '--json')\n"
             f"run('tools/inspect_data.py', '--prefix', {p!r}, '--pack', '1', '--tokenizer-model', {tok!r})\n"
             f"run('tools/visualize_patches.py', '--prefix', {p!r}, '--pack', '1', '--tokenizer-model', {tok!r}, "
             f"'--out', {png!r})\n"
             "print('HEAVY', sorted(m for m in ('torch', 'megatron.core', 'transformers') if m in sys.modules), "
             "file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.count("EXIT 0") == 3, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1] == "HEAVY []", r.stderr[-3000:]
    shown = json.loads(r.stdout.splitlines()[0])
    assert "[[" in r.stdout and os.path.getsize(png) > 0 and "wrote " + png in r.stdout

    from megatron_solo.data.dataset import build_sample
    from megatron_solo.data.indexed import SoloIndexedDataset

    ds = SoloIndexedDataset(p)  # megatron-core's reader, as training reads it
    n = ds.pack_length(1)
    s = build_sample(ds.pack(1), n, "assistant", ds.vocab)
    assert shown["tokens"] == s["tokens"].tolist() and sum(shown["loss_mask"]) == int(s["loss_mask"].sum()) > 0
    assert shown["loss_mask"][1:] == (s["loss_mask"][:-1] > 0).int().tolist()


# ---------------------------------------------------------------- quiet, one-time output (issue 26.7)
def test_a_log_line_is_cut_at_its_separators_to_fit_160_columns():
    """Megatron's iteration line (330 columns at a GPU run's parts) as lines of at most 160, every part whole
    and in order, a group starting a line; the real run's output is checked in test_training (Ctrl-C run)."""
    from megatron_solo.training.logger import fit_width

    progress = [" [2026-12-03 12:33:57] iteration        1/     200", "consumed samples:            2",
                "elapsed time per iteration (ms): 5860.2"]
    step = ["learning rate: 4.999692E-05", "vision learning rate: 1.000000E-04", "global batch size:     2",
            "lm loss: 1.055923E+01", "image-doc loss: 1.055923E+01", "text-doc loss: 1.055923E+01",
            "grad norm: 9.711"]
    rate = ["number of skipped iterations:   0", "tokens/s: 43.7", "images/s: 4.78", "TFLOP/s/GPU: 400.1",
            "MFU: 45.0%"]
    lines = fit_width(progress, step, rate).split("\n")
    assert max(map(len, lines)) <= 160 and len(lines) == 4
    assert [p.strip() for line in lines for p in line.split(" |")[:-1]] == [p.strip() for p in progress + step + rate]
    assert lines[1].startswith("    learning rate") and lines[3].startswith("    number of skipped")


def test_a_plan_needs_none_of_the_jobs_inputs(tmp_path, monkeypatch):
    """docs/TRAINING.md's stage-1 flags with --dry-run where none of its inputs exist yet (tok/tokenizer.model,
    the data prefixes): the plan reads none of them, as the docs say (DRY_RUN=1 on the documented command once
    stopped at `error: --tokenizer-model tok/tokenizer.model does not exist`); without --dry-run the same flags
    stop at the first missing input. (The launcher's DRY_RUN path: test_first_hour.py.)"""
    from megatron_solo.errors import InputError
    from megatron_solo.training.early_checks import check_before_imports

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "8")
    flags = ["--model", "solo-7b", "--seq-length", "4096", "--global-batch-size", "64", "--bf16",
             "--use-distributed-optimizer", "--tensor-model-parallel-size", "2", "--train-iters", "20000",
             "--data-path", "0.7", "data/in21k", "0.3", "data/slimpajama", "--tokenizer-model", "tok/tokenizer.model"]
    args = build_parser().parse_args(flags + ["--dry-run"])
    check_before_imports(args)
    cfg = build_train_config(args)  # the plan itself: test_dry_run.py
    assert (cfg.dry_run.enabled, cfg.data.tokenizer_model, cfg.parallel.data) == (True, "tok/tokenizer.model", 4)
    with pytest.raises((ArgumentError, InputError), match="^--tokenizer-model tok/tokenizer.model does not exist$"):
        check_before_imports(build_parser().parse_args(flags))


def test_a_rendezvous_port_in_use_is_one_line(capsys):
    """Two runs on one machine with the launchers' default MASTER_PORT: torchrun's agent cannot open its
    store and raised a 44-line DistNetworkError traceback (EADDRINUSE); the launchers' torchrun ends with one
    line naming the port and the variable, exit 2, before any worker starts."""
    import re
    import socket

    from megatron_solo.training import torchrun

    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        code = torchrun.main(["--nproc-per-node", "1", "--master-port", str(port), "-m", "megatron_solo.train", "--help"])
    out = capsys.readouterr()
    assert (code, out.out) == (2, ""), out.err[-3000:]
    assert re.fullmatch(f"error: port {port} \\(torchrun's --master-port; MASTER_PORT in the launchers\\) is in use on "
                        f"this machine, by another run perhaps; choose a free port \\(e.g. MASTER_PORT=\\d+\\)\n",
                        out.err), out.err[-3000:]


@contextlib.contextmanager
def _logged(name: str):
    """(the logger ``name``, the messages a handler on it receives while the block runs): what a user would
    see of that logger after its own filters (quiet.filter_known_warnings installs them on the logger)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger(name)
    log.addHandler(handler)
    try:
        yield log, messages
    finally:
        log.removeHandler(handler)


def test_torchruns_thread_banner_is_filtered_by_its_text(monkeypatch):
    """torchrun's own emitter (config_from_args, 2 processes, OMP_NUM_THREADS unset) under the filters the
    launchers' torchrun installs: its 4-line OMP_NUM_THREADS banner is dropped, the setting it makes stays."""
    from torch.distributed.run import config_from_args, get_args_parser

    from megatron_solo import quiet

    quiet.filter_known_warnings()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored after the test
    with _logged("torch.distributed.run") as (run_log, messages):
        config_from_args(get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "megatron_solo.train"]))
        run_log.warning("another torchrun warning")
    assert messages == ["another torchrun warning"]
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_generate_loads_the_model_once_for_a_whole_jsonl(export_and_images, monkeypatch, capsys):
    """Issue 26.5's point of --input: one model load (and one processor) for every record, counted on
    transformers' own from_pretrained (called through, not replaced); no weight-loading progress bar."""
    from transformers import AutoModelForCausalLM

    root, hf = export_and_images
    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *a, **kw):
        loads.append(a[0] if a else kw.get("pretrained_model_name_or_path"))
        return real(cls, *a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    (root / "four.jsonl").write_text("".join(json.dumps({"prompt": f"Digit {i}?", "image": f"d{1 + i % 2}.png"}) + "\n"
                                             for i in range(4)))
    assert _tool("generate").main(["--hf-dir", hf, "--max-new-tokens", "1", "--input", str(root / "four.jsonl"),
                                   "--image-root", str(root)]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 4 and loads == [hf]
    assert "Loading weights" not in out.err  # transformers' progress bar, noise before the answers


def test_a_blend_of_one_prefix_is_not_announced(capsys):
    """DATA_PATH="1.0 data/sft_chat" (docs/TRAINING.md's SFT line) made megatron-core's BlendedDataset warn
    `Building a BlendedDataset for a single MegatronDataset` once per split; the blend is valid, the line is
    filtered by its text, another of that logger's warnings still shows."""
    from megatron_solo import quiet

    quiet.filter_known_warnings()
    with _logged("megatron.core.datasets.blended_dataset") as (blend_log, messages):
        blend_log.warning("Building a BlendedDataset for a single MegatronDataset")
        blend_log.warning("another blend warning")
    assert messages == ["another blend warning"]


def test_the_tiny_base_writer_answers_help_quietly():
    """`python -m megatron_solo.demo.tiny_base --help` (docs/TRAINING.md's command for a toy Llama base) printed
    six lines of torch's and megatron-core's import-time warnings before its usage: megatron-core (under
    model.config) and transformers are now imported when it writes a model."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['tiny_base', '--help']\n"
             "try:\n"
             "    runpy.run_module('megatron_solo.demo.tiny_base', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    assert e.code in (0, None), e.code\n"
             "print('HEAVY', sorted(m for m in ('torch', 'megatron.core', 'transformers') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert (r.returncode, r.stderr) == (0, ""), r.stderr[-3000:]
    assert "--tokenizer-dir" in r.stdout and r.stdout.splitlines()[-1] == "HEAVY ['torch']"  # families' mapping
