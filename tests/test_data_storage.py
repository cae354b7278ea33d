"""--image-storage encoded: byte-identical patches to patches storage, worker-count determinism, layout."""

import io
import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image

from megatron_solo.data.image_storage import FLAG_EXIF, IDX_FIELDS
from megatron_solo.data.index_file import IndexFile
from megatron_solo.data.indexed import SoloIndexedDataset, prefix_complete, prefix_storage
from megatron_solo.data.merge import merge_prefixes
from megatron_solo.data.preprocess import PreprocessConfig, preprocess
from tests.data_fixtures.helpers import data_url, jpeg_bytes, png_bytes, sample_photos, solo_tokenizer_path


def _odd_images():
    """Real photos (sklearn) and odd shapes/modes/formats: what each storage rule must survive."""
    china, flower = sample_photos()
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: EXIF must be applied the same way on both paths
    gif = io.BytesIO()
    flower.resize((50, 37)).convert("P").save(gif, format="GIF")
    webp = io.BytesIO()
    china.resize((70, 45)).save(webp, format="WEBP", quality=80)
    tiff = io.BytesIO()
    flower.resize((33, 65)).save(tiff, format="TIFF")
    rgba = china.resize((40, 90)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 90)))
    return [
        ("image/jpeg", jpeg_bytes(china)),  # 640x427: 260 patches, split across packs of 128
        ("image/jpeg", jpeg_bytes(flower.resize((300, 200)), exif=exif.tobytes())),
        ("image/png", png_bytes(rgba)),
        ("image/png", png_bytes(Image.fromarray(np.full((7, 5), 40000, np.uint16)))),  # 16-bit gray
        ("image/png", png_bytes(china.resize((1, 300)))),  # tall, 1 pixel wide
        ("image/jpeg", jpeg_bytes(flower.resize((1200, 20)).convert("CMYK"))),  # > 1024 long side
        ("image/gif", gif.getvalue()),
        ("image/webp", webp.getvalue()),
        ("image/tiff", tiff.getvalue()),
    ]


@pytest.fixture(scope="module")
def odd_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("storage")
    with open(d / "c.jsonl", "w") as f:
        for i, (mime, data) in enumerate(_odd_images()):
            f.write(json.dumps([{"role": "assistant", "content": [
                {"type": "text", "text": f"image {i}:"},
                {"type": "image_url", "image_url": {"url": data_url(data, mime)}},
                {"type": "text", "text": "and a short caption that goes on."}]}]) + "\n")
    out = {}
    for storage, workers in (("patches", 1), ("encoded", 1), ("encoded", 2)):
        prefix = str(d / f"{storage}_w{workers}")
        out[storage, workers] = preprocess(PreprocessConfig(
            inputs=[str(d / "c.jsonl")], output_prefix=prefix, tokenizer_model=solo_tokenizer_path(),
            seq_length=128, workers=workers, image_storage=storage, progress=False)), prefix
    return d, out


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_encoded_patches_are_byte_identical_to_patches_storage(odd_corpus):
    _, out = odd_corpus
    pat, enc = SoloIndexedDataset(out["patches", 1][1]), SoloIndexedDataset(out["encoded", 1][1])
    assert (pat.storage, enc.storage) == ("patches", "encoded")
    assert len(pat) == len(enc) and len(enc.segment_lengths) > 9  # the 640x427 photo is split
    n_patches = 0
    for i in range(len(pat)):
        a, b = pat.pack(i), enc.pack(i)
        assert len(a) == len(b)
        for (ta, ra, pa), (tb, rb, pb) in zip(a, b):
            assert np.array_equal(ta, tb) and np.array_equal(ra, rb)
            assert pb.dtype == np.uint8 and pa.shape == pb.shape and np.array_equal(pa, pb)
            n_patches += len(pa)
        # reading a prefix of the pack (what training does with seq_length + 1) decodes only what it needs
        for (_, _, pa), (_, _, pb) in zip(pat.pack(i, max_tokens=40), enc.pack(i, max_tokens=40)):
            assert np.array_equal(pa, pb)
    assert n_patches == out["patches", 1][0]["patches"] == out["encoded", 1][0]["patches"] > 260
    for n in ("tokens", "roles"):
        for e in (".bin", ".idx"):
            assert _read(f"{out['patches', 1][1]}-{n}{e}") == _read(f"{out['encoded', 1][1]}-{n}{e}")


def test_numpy_reader_reads_what_megatron_core_reads(odd_corpus):
    """The inspection tools' reader (data/index_file.py: numpy only) against megatron-core's IndexedDataset on
    every dataset of both storages: the same arrays, the same sequences, the same packs (mmap or not)."""
    _, out = odd_corpus
    for key in (("patches", 1), ("encoded", 1)):
        prefix = out[key][1]
        names = ("tokens", "roles", "patches") if key[0] == "patches" else ("tokens", "roles", "images", "imageidx")
        for n in names:
            ref = IndexedDataset(f"{prefix}-{n}")
            for mmap in (True, False):
                mine = IndexFile(f"{prefix}-{n}", mmap=mmap)
                assert len(mine) == len(ref) > 9 and mine.dtype == ref.index.dtype
                assert np.array_equal(mine.sequence_lengths, ref.sequence_lengths)
                assert np.array_equal(mine.document_indices, ref.document_indices)
                for i in range(len(ref)):
                    assert np.array_equal(mine[i], ref[i]), (n, i)
                    k = int(ref.sequence_lengths[i])
                    assert np.array_equal(mine.get(i, k // 3, k // 2), ref.get(i, k // 3, k // 2)), (n, i)
        a, b = SoloIndexedDataset(prefix), SoloIndexedDataset(prefix, reader="numpy")
        assert len(a) == len(b)
        for i in range(len(a)):
            for sa, sb in zip(a.pack(i, with_coords=True), b.pack(i, with_coords=True), strict=True):
                assert all(np.array_equal(x, y) for x, y in zip(sa, sb, strict=True))


def test_numpy_reader_refuses_a_file_that_is_not_an_index(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="bad header, cannot read: .*bad.idx"):
        IndexFile(str(tmp_path / "bad"))


def test_encoded_layout_and_stats(odd_corpus):
    _, out = odd_corpus
    stats, prefix = out["encoded", 1]
    assert prefix_complete(prefix) and prefix_storage(prefix) == "encoded"
    images, idx = IndexedDataset(prefix + "-images"), IndexedDataset(prefix + "-imageidx")
    tokens = IndexedDataset(prefix + "-tokens")
    assert len(images) == len(idx) == len(tokens)
    rows = np.concatenate([idx[s] for s in range(len(idx))]).reshape(-1, IDX_FIELDS)
    # documented layout: n_bytes sum to the segment's bytes; patch ranges cover each <vpatch>
    for s in range(len(idx)):
        r = idx[s].reshape(-1, IDX_FIELDS)
        assert r[:, 0].sum() == len(images[s])
        assert (r[:, 3] - r[:, 2]).sum() == np.count_nonzero(tokens[s] == 32001)
    originals = {data for _, data in _odd_images()}
    kept = [bytes(images[s][int(r[:s_i, 0].sum()):int(r[:s_i + 1, 0].sum())])
            for s in range(len(idx)) for r in [idx[s].reshape(-1, IDX_FIELDS)] for s_i in range(len(r))]
    assert sum(k in originals for k in kept) >= 6  # JPEG, PNG, WebP originals kept as they are
    assert any(k.startswith(b"\x89PNG") and k not in originals for k in kept)  # GIF/TIFF re-encoded
    assert set(rows[:, 1].tolist()) <= {0, FLAG_EXIF}
    assert stats["image_storage"] == "encoded" and out["patches", 1][0]["image_storage"] == "patches"
    assert stats["bytes_per_image"] < out["patches", 1][0]["bytes_per_image"] / 3  # odd images; photos: benchmarks
    assert stats["bytes_per_token"] > 0 and stats["image_bytes"] > 0


def test_encoded_storage_is_identical_across_worker_counts_and_merges(odd_corpus, tmp_path):
    _, out = odd_corpus
    a, b = out["encoded", 1][1], out["encoded", 2][1]
    for n in ("tokens", "roles", "images", "imageidx"):
        for e in (".bin", ".idx"):
            assert _read(f"{a}-{n}{e}") == _read(f"{b}-{n}{e}"), n + e
    merged = str(tmp_path / "m")
    merge_prefixes([a, b], merged)
    m = SoloIndexedDataset(merged)
    assert m.storage == "encoded" and len(m) == 2 * len(SoloIndexedDataset(a))
    with pytest.raises(ValueError, match="different image storages"):
        merge_prefixes([a, out["patches", 1][1]], str(tmp_path / "mixed"))


def test_dataloader_workers_give_the_in_process_batches(odd_corpus):
    """--num-workers: the same micro-batches, in the same order, as reading in the training process,
    and encoded storage gives the batches of patches storage."""
    import torch

    from megatron_solo.data.dataset import build_train_valid_test_datasets, collate
    from megatron_solo.data.loader import WorkerBatchStream, micro_batch_indices

    _, out = odd_corpus
    kw = dict(split="1,0,0", seq_length=64, train_samples=12, valid_samples=0, test_samples=0)
    enc = build_train_valid_test_datasets(out["encoded", 1][1], **kw)[0]
    pat = build_train_valid_test_datasets(out["patches", 1][1], **kw)[0]
    # global batch 4 = 2 micro-batches of 2; starts as a resume after 4 consumed samples
    stream = WorkerBatchStream(enc, global_batch_size=4, micro_batch_size=2, num_microbatches=2, dp=1, dp_rank=0,
                               consumed=4, num_workers=2)
    try:
        for step in range(3):
            got = stream.global_step()
            for m, batch in enumerate(got):
                idx = micro_batch_indices(4 + 4 * step, m, 2, 1, 0, len(enc))
                want = collate([pat[i] for i in idx])
                assert set(batch) == set(want)
                for k in want:
                    assert torch.equal(batch[k], want[k]), (step, m, k)
        assert stream.consumed == 16
    finally:
        stream.close()


def test_a_worker_error_is_raised_as_itself(odd_corpus):
    """An exception in a DataLoader worker reaches the training process with its own type and message."""
    from megatron_solo.data.dataset import build_train_valid_test_datasets
    from megatron_solo.data.loader import WorkerBatchStream

    class Broken:
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            raise FileNotFoundError(f"sample {i}: gone")

    _, out = odd_corpus
    ds = build_train_valid_test_datasets(out["encoded", 1][1], split="1,0,0", seq_length=64, train_samples=4,
                                         valid_samples=0, test_samples=0)[0]
    stream = WorkerBatchStream(Broken(ds), global_batch_size=2, micro_batch_size=1, num_microbatches=2, dp=1,
                               dp_rank=0, consumed=0, num_workers=1)
    try:
        with pytest.raises(FileNotFoundError) as info:
            stream.global_step()
        assert str(info.value) == "sample 0: gone"  # the worker's traceback is a note, not the message
    finally:
        stream.close()
