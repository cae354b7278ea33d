"""--shard-size: resumable shards (kill -9 + rerun = the uninterrupted bytes) and shard sets as one source."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_solo.data.dataset import build_train_valid_test_datasets, parse_data_path
from megatron_solo.data.indexed import SoloIndexedDataset, prefix_complete
from megatron_solo.data.preprocess import PreprocessConfig, preprocess
from megatron_solo.data.shards import shard_prefix
from tests.data_fixtures.helpers import solo_tokenizer_path, write_chat_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DOCS, SHARD = 96, 8


def _cli(*args):
    return [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--tokenizer-model",
            solo_tokenizer_path(), "--no-progress", "--format", "chat", "--seq-length", "96", *map(str, args)]


def _all_bytes(d, name):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if f.startswith(name)}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_chat_corpus(str(d / "c.jsonl"), N_DOCS, seed=3)
    ref = d / "ref"
    ref.mkdir()
    stats = preprocess(PreprocessConfig(inputs=[str(d / "c.jsonl")], output_prefix=str(ref / "p"),
                                        tokenizer_model=solo_tokenizer_path(), fmt="chat", seq_length=96,
                                        shard_size=SHARD, image_storage="encoded", progress=False))
    return d, ref, stats


def test_kill_9_then_rerun_gives_the_uninterrupted_bytes(sharded):
    d, ref, stats = sharded
    assert len(stats["shards"]) == N_DOCS // SHARD and stats["shards_skipped"] == 0
    assert stats["documents"] == N_DOCS and stats["image_storage"] == "encoded"
    out = d / "killed"
    out.mkdir()
    cmd = _cli("--input", d / "c.jsonl", "--output-prefix", out / "p", "--shard-size", SHARD,
               "--image-storage", "encoded")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not prefix_complete(shard_prefix(str(out / "p"), 1)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "p.shards").exists(), "the tool finished before it was killed: make the corpus bigger"
    done_before = sum(prefix_complete(shard_prefix(str(out / "p"), k)) for k in range(N_DOCS // SHARD))
    assert 2 <= done_before < N_DOCS // SHARD
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] == done_before and summary["documents"] == N_DOCS
    a, b = _all_bytes(ref, "p"), _all_bytes(out, "p")
    stats_files = [f for f in a if f.endswith(".stats.json")]
    assert sorted(a) == sorted(b) and len(a) == (N_DOCS // SHARD) * 9 + 1  # 8 data files + stats each, list
    for f in a:
        if f not in stats_files:  # stats hold timings; every data byte must match
            assert a[f] == b[f], f
    # a third run has nothing to do
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "is complete; nothing to do" in r.stdout


def test_shard_set_is_one_data_path_source(sharded):
    _, ref, stats = sharded
    shards = stats["shards"]
    listing = str(ref / "p.shards")
    assert parse_data_path(listing) == (shards, None)
    assert parse_data_path(str(ref / "p_*")) == (shards, None)
    prefixes, weights = parse_data_path(f"0.25 {listing} 0.75 {shards[0]}")
    assert prefixes == shards + shards[:1]
    packs = np.array([len(SoloIndexedDataset(p)) for p in shards], float)
    assert np.allclose(weights[:-1], 0.25 * packs / packs.sum()) and weights[-1] == 0.75
    with pytest.raises(FileNotFoundError, match="no complete prefix"):
        parse_data_path(str(ref / "nothing_*"))
    train, _, _ = build_train_valid_test_datasets(listing, split="1,0,0", seq_length=96, train_samples=int(packs.sum()),
                                                  valid_samples=0, test_samples=0)
    seen = sum(int(train[i]["patches"].shape[0]) for i in range(len(train)))
    assert len(train) == int(packs.sum()) and seen > 0


def test_blend_tools_take_a_shard_set(sharded, tmp_path):
    from tests.conftest import run_tool

    _, ref, stats = sharded
    run_tool(["tools/merge_datasets.py", "--input", str(ref / "p.shards"), "--output-prefix", str(tmp_path / "m")])
    assert len(SoloIndexedDataset(str(tmp_path / "m"))) == stats["packs"]
    r = run_tool(["tools/data_mixture.py", "--mix", "1", str(ref / "p_*"), "--seq-length", "96",
                  "--global-batch-size", "4"])
    assert json.loads(r.stdout)["samples_per_source"] == [stats["packs"]]
