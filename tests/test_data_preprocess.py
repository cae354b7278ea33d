"""tools/preprocess_data.py: formats, bad inputs, image modes, determinism across workers, atomicity."""

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import lz4.frame
import numpy as np
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image

from megatron_solo.data.image import image_to_patches, load_image
from megatron_solo.data.indexed import SoloIndexedDataset, prefix_complete
from megatron_solo.data.merge import merge_prefixes
from megatron_solo.data.preprocess import PreprocessConfig, TooManyErrors, preprocess
from tests.data_fixtures.helpers import (
    data_url,
    jpeg_bytes,
    png_bytes,
    small_photo,
    solo_tokenizer,
    solo_tokenizer_path,
    write_chat_corpus,
)

VPATCH = 32001
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(inputs, prefix, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("image_storage", "patches")  # these tests read P-patches; test_data_storage.py covers encoded
    return preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix),
                                       tokenizer_model=solo_tokenizer_path(), **kw))


def files(prefix):
    return {n + e: open(f"{prefix}-{n}{e}", "rb").read() for n in ("tokens", "roles", "patches") for e in (".bin", ".idx")}


def all_tokens(prefix):
    ds = SoloIndexedDataset(str(prefix))
    return [np.concatenate([t for t, _, _ in ds.pack(i)]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = write_chat_corpus(str(d / "c.jsonl"), 24, seed=1)
    return d, docs


def test_chat_corpus_all_compressions_and_stats(corpus, tmp_path):
    d, docs = corpus
    raw = (d / "c.jsonl").read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.lz4").write_bytes(lz4.frame.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    s = run([d / "c.jsonl"], tmp_path / "plain", fmt="chat")
    for ext in ("gz", "lz4", "zst"):
        run([tmp_path / f"c.jsonl.{ext}"], tmp_path / ext, fmt="chat")
        assert files(tmp_path / ext) == files(tmp_path / "plain")
    assert s["documents"] == 24 and s["packs"] == 24 and s["skipped_total"] == 0
    n_img = sum(1 for doc in docs for p in doc[1]["content"] if p["type"] == "image_url")
    assert s["images"] == n_img
    stats = json.load(open(tmp_path / "plain.stats.json"))
    assert stats["tokens"] == s["tokens"] and stats["patches"] == s["patches"] > 0
    tok = IndexedDataset(str(tmp_path / "plain-tokens"))
    assert int(tok.sequence_lengths.sum()) == s["tokens"]
    assert int((np.concatenate([tok[i] for i in range(len(tok))]) == VPATCH).sum()) == s["patches"]
    assert IndexedDataset(str(tmp_path / "plain-patches")).sequence_lengths.sum() == 3072 * s["patches"]
    # rerunning on a complete prefix is a no-op unless --overwrite
    assert run([d / "c.jsonl"], tmp_path / "plain", fmt="chat") == {"skipped_existing": True}
    assert run([d / "c.jsonl"], tmp_path / "plain", fmt="chat", overwrite=True)["documents"] == 24


def test_workers_give_byte_identical_output_and_packing(corpus, tmp_path):
    d, _ = corpus
    run([d / "c.jsonl", d / "c.jsonl"], tmp_path / "w1", fmt="pretrain", seq_length=64, workers=1)
    run([d / "c.jsonl", d / "c.jsonl"], tmp_path / "w2", fmt="pretrain", seq_length=64, workers=2)
    assert files(tmp_path / "w1") == files(tmp_path / "w2")
    run([d / "c.jsonl", d / "c.jsonl"], tmp_path / "unpacked", fmt="pretrain")
    packed, unpacked = all_tokens(tmp_path / "w1"), all_tokens(tmp_path / "unpacked")
    assert all(len(p) <= 64 for p in packed) and len(packed) < len(unpacked)
    assert np.array_equal(np.concatenate(packed), np.concatenate(unpacked))
    # merging two shards gives the concatenation
    run([d / "c.jsonl"], tmp_path / "s0", fmt="pretrain")
    run([d / "c.jsonl"], tmp_path / "s1", fmt="pretrain")
    merge_prefixes([str(tmp_path / "s0"), str(tmp_path / "s1")], str(tmp_path / "m"))
    assert files(tmp_path / "m") == files(tmp_path / "unpacked")
    assert json.load(open(tmp_path / "m.stats.json"))["documents"] == 48


def test_sharded_and_merged_stats_are_the_unsharded_stats(corpus, tmp_path):
    """One rule sums prefixes' stats (PrefixStats.total): a sharded run's totals and the merge of its
    shards count what the unsharded run of the same records counts (unpacked: a document is a pack)."""
    d, _ = corpus
    (tmp_path / "bad.jsonl").write_text("{not json\n" + json.dumps({"no": "messages"}) + "\n")
    inputs, kw = [d / "c.jsonl", tmp_path / "bad.jsonl"], dict(fmt="chat", max_error_rate=0.5)
    whole = run(inputs, tmp_path / "whole", **kw)
    sharded = run(inputs, tmp_path / "sh", shard_size=13, **kw)  # two shards: megatron's add_index runs gc.collect
    merged = merge_prefixes(sharded["shards"], str(tmp_path / "m"))
    on_disk = json.load(open(tmp_path / "m.stats.json"))
    assert len(sharded["shards"]) == 2 and whole["skipped"] == {"invalid_json": 1, "missing_field": 1}
    for key in ("records", "documents", "packs", "segments", "tokens", "image_tokens", "images", "patches", "skipped",
                "skipped_total", "image_storage", "image_bytes", "data_bytes", "bytes_per_image", "bytes_per_token"):
        assert sharded[key] == merged[key] == on_disk[key] == whole[key], key
    assert "workers" not in sharded  # a setting, not a count: never summed over shards


def test_llava_json_and_webdataset_tar(tmp_path):
    imgs = [small_photo(i, (60 + 10 * i, 40)) for i in range(3)]
    (tmp_path / "imgs").mkdir()
    for i, im in enumerate(imgs):
        im.save(tmp_path / "imgs" / f"{i}.jpg", quality=95)
    recs = [{"image": f"{i}.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": f"Thing {i}."}]} for i in range(3)]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    s = run([tmp_path / "llava.json"], tmp_path / "llava", fmt="chat", image_root=str(tmp_path / "imgs"))
    assert s["documents"] == 3 and s["images"] == 3
    # tar shard: KEY.jpg + KEY.txt (ImageNet-21k style "image, then class name"), KEY.png + KEY.json
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, name, data in [("a", "a.jpg", jpeg_bytes(imgs[0])), ("a", "a.txt", b"goldfish"),
                                ("b", "b.png", png_bytes(imgs[1])), ("b", "b.json", b'{"caption": "a tree"}'),
                                ("c", "c.txt", b"no image")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shard.tar").write_bytes(buf.getvalue())
    s = run([tmp_path / "shard.tar"], tmp_path / "wds", max_error_rate=0.5)
    assert s["documents"] == 2 and s["skipped"] == {"bad_sample": 1}
    t0 = all_tokens(tmp_path / "wds")[0]
    tok = solo_tokenizer()
    p, r, c = image_to_patches(load_image(jpeg_bytes(imgs[0])))
    nb = r * c + r - 1 + 2
    assert t0[0] == 1 and t0[1] == 32000 and t0[nb] == 32004 and tok.decode(t0[nb + 1:]) == "goldfish"
    ds = SoloIndexedDataset(str(tmp_path / "wds"))
    assert np.array_equal(ds.pack(0)[0][2], p)


def _img_part(data, mime="image/png"):
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


def _doc(*parts):
    return json.dumps([{"role": "assistant", "content": [*parts, {"type": "text", "text": "caption"}]}])


def test_bad_inputs_are_skipped_counted_and_located(tmp_path, caplog):
    good = _img_part(jpeg_bytes(small_photo(0, (64, 64))), "image/jpeg")
    photo_png = png_bytes(small_photo(1, (64, 64)))
    lines = [
        _doc(good),                                                     # 1 ok
        "{not json",                                                    # 2 invalid_json
        json.dumps({"foo": 1}),                                         # 3 missing_field
        json.dumps([{"role": "user", "content": [{"type": "audio"}]}]),  # 4 unknown_part_type
        _doc({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}),  # 5 bad_base64
        _doc(_img_part(photo_png[: len(photo_png) // 2])),             # 6 truncated -> corrupt_image
        _doc(_img_part(b"this is not an image")),                      # 7 corrupt_image
        _doc(_img_part(b"")),                                          # 8 empty_image
        _doc({"type": "image_url", "image_url": {"url": "missing.jpg"}}),  # 9 missing_image_file
        json.dumps([{"role": "assistant", "content": "   "}]),         # 10 empty_document
        json.dumps([]),                                                # 11 empty_document
        _doc(_img_part(png_bytes(Image.new("RGB", (1, 1), (9, 8, 7))))),  # 12 ok: a 1-pixel image
        _doc({"type": "image_url", "image_url": {"url": "https://example.com/x.jpg"}}),  # 13 unsupported_url
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        s = run([tmp_path / "bad.jsonl"], tmp_path / "out", image_root=str(tmp_path), max_error_rate=1.0)
    assert s["documents"] == 2 and s["records"] == 13
    assert s["skipped"] == {"invalid_json": 1, "missing_field": 1, "unknown_part_type": 1, "bad_base64": 1,
                            "corrupt_image": 2, "empty_image": 1, "missing_image_file": 1, "empty_document": 2,
                            "unsupported_url": 1}
    assert f"{tmp_path / 'bad.jsonl'}:2: invalid_json" in caplog.text
    assert f"{tmp_path / 'bad.jsonl'}:7: corrupt_image" in caplog.text
    # the 1-pixel image became one 32x32 patch of its colour
    p = SoloIndexedDataset(str(tmp_path / "out")).pack(1)[0][2]
    assert p.shape == (1, 3072) and np.all(p.reshape(3, -1)[:, 0] == [9, 8, 7])
    # a mostly broken corpus: non-zero outcome, and no prefix left behind
    with pytest.raises(TooManyErrors, match="skipped"):
        run([tmp_path / "bad.jsonl"], tmp_path / "strict", image_root=str(tmp_path))
    assert not any(f.name.startswith("strict") for f in tmp_path.iterdir())


def test_decompression_bomb_reason(tmp_path):
    big = png_bytes(Image.new("RGB", (200, 200)))
    (tmp_path / "b.jsonl").write_text(_doc(_img_part(big)) + "\n" + _doc(_img_part(png_bytes(Image.new("RGB", (8, 8))))) + "\n")
    s = run([tmp_path / "b.jsonl"], tmp_path / "o", max_image_pixels=10_000, max_error_rate=0.6)
    assert s["skipped"] == {"decompression_bomb": 1} and s["documents"] == 1


def _patches_of(data, **kw):
    return image_to_patches(load_image(data, **kw))


def test_image_modes_convert_to_rgb_correctly():
    # palette: same as its RGB rendering
    rgb = small_photo(0, (64, 64))
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=64)
    assert np.array_equal(_patches_of(png_bytes(pal))[0], image_to_patches(pal.convert("RGB"))[0])
    # LA / RGBA: transparent pixels become white, opaque keep their value
    la = Image.new("LA", (32, 32), (50, 255))
    la.paste((50, 0), (0, 0, 16, 32))
    p = _patches_of(png_bytes(la))[0].reshape(3, 32, 32)
    assert np.all(p[:, :, :16] == 255) and np.all(p[:, :, 16:] == 50)
    # CMYK JPEG: PIL's conversion
    cmyk = rgb.convert("CMYK")
    data = jpeg_bytes(cmyk, quality=100)
    assert np.array_equal(_patches_of(data)[0], image_to_patches(Image.open(io.BytesIO(data)).convert("RGB"))[0])
    assert np.abs(_patches_of(data)[0].astype(int) - image_to_patches(rgb)[0].astype(int)).mean() < 6
    # 16-bit grayscale: scaled to 8 bits, not clipped
    g16 = Image.fromarray(np.full((32, 32), 257 * 100, np.uint16))
    assert g16.mode.startswith("I")
    assert np.all(_patches_of(png_bytes(g16))[0] == 100)


def test_exif_rotation_is_applied_by_default():
    img = Image.new("RGB", (64, 32), (200, 0, 0))
    img.paste((0, 0, 200), (0, 0, 32, 32))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = jpeg_bytes(img, quality=100, exif=exif.tobytes())
    p, r, c = _patches_of(data)
    assert (r, c) == (2, 1)  # displayed upright: 32 wide, 64 high; the blue half is on top
    assert p[0].reshape(3, 32, 32)[2].mean() > 150 and p[1].reshape(3, 32, 32)[0].mean() > 150
    _, r, c = _patches_of(data, exif_transpose=False)  # SOLO's behaviour, on request
    assert (r, c) == (1, 2)


def _cli(*args):
    return [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--tokenizer-model",
            solo_tokenizer_path(), "--no-progress", *map(str, args)]


def test_cli_error_exit_and_kill_leaves_no_complete_prefix(corpus, tmp_path):
    d, _ = corpus
    (tmp_path / "broken.jsonl").write_text("{oops\n" * 3 + (d / "c.jsonl").read_text().splitlines()[0] + "\n")
    r = subprocess.run(_cli("--input", tmp_path / "broken.jsonl", "--output-prefix", tmp_path / "x"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "invalid_json" in r.stderr and "no prefix written" in r.stderr
    assert not any(f.name.startswith("x") for f in tmp_path.iterdir())
    # kill mid-run: a corpus big enough to be caught while writing
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for _ in range(200):  # ~4,800 documents: seconds of work even for the fast encoded storage
            f.write((d / "c.jsonl").read_text())
    proc = subprocess.Popen(_cli("--input", big, "--output-prefix", tmp_path / "k", "--workers", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "k-tokens.bin.tmp").exists():
        time.sleep(0.02)
    assert (tmp_path / "k-tokens.bin.tmp").exists()
    time.sleep(0.1)
    assert proc.poll() is None, "the tool finished before it could be killed: make the corpus bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not prefix_complete(str(tmp_path / "k"))
    assert not any(f.name.endswith(".idx") for f in tmp_path.iterdir())


def test_cli_worker_killed_by_the_os_is_one_error_line(corpus, tmp_path):
    import psutil

    d, _ = corpus
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for _ in range(200):  # ~4,800 documents: the workers are still busy when one is killed
            f.write((d / "c.jsonl").read_text())
    proc = subprocess.Popen(_cli("--input", big, "--output-prefix", tmp_path / "w", "--workers", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "w-tokens.bin.tmp").exists():
        time.sleep(0.02)
    workers = [c for c in psutil.Process(proc.pid).children()
               if "resource_tracker" not in " ".join(c.cmdline())]  # multiprocessing's own helper
    assert len(workers) == 2 and proc.poll() is None, "the tool finished before a worker could be killed"
    workers[1].kill()  # as the out-of-memory killer would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "died with signal SIGKILL" in lines[0] and "no prefix written" in lines[0], err
    assert "Traceback" not in err
    assert not prefix_complete(str(tmp_path / "w"))
    assert not any(f.name.startswith("w-") for f in tmp_path.iterdir()), sorted(f.name for f in tmp_path.iterdir())
    for w in workers:
        assert not w.is_running() or w.status() == psutil.STATUS_ZOMBIE


def test_line_scan_rss_does_not_grow_with_the_input(tmp_path):
    from megatron_solo.data.readers import iter_records

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024

    big = tmp_path / "big.jsonl"
    line = b"x" * ((1 << 20) - 1) + b"\n"
    with open(big, "wb") as f:
        for _ in range(192):  # 192 MiB, three times the 64 MiB after which scanned pages are released
            f.write(line)
    start, peak, n = rss_mib(), 0.0, 0
    for where, kind, ref in iter_records([str(big)], by_reference=True):
        n += 1
        peak = max(peak, rss_mib())
    assert n == 192 and kind == "lineref" and ref == (str(big), 191 << 20, 1 << 20)
    assert peak - start < 100, f"RSS grew {peak - start:.0f} MiB while scanning a 192 MiB file"


def test_cli_bad_tokenizer_is_one_error_line_before_any_work(corpus, tmp_path):
    from megatron_solo.data.tokenizer import mistral_tokenizer_path

    d, _ = corpus
    for tok, says in ((tmp_path / "missing.model", "tokenizer model not found"),
                      (d / "c.jsonl", "could not parse ModelProto"),
                      (mistral_tokenizer_path(), "a SOLO tokenizer has 33031")):
        cmd = _cli("--input", d / "c.jsonl", "--output-prefix", tmp_path / "t", "--workers", "2")
        cmd[cmd.index("--tokenizer-model") + 1] = str(tok)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: --tokenizer-model: ") and says in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not any(f.name.startswith("t") for f in tmp_path.iterdir() if f.name != "missing.model")
