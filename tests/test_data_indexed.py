"""Indexed writing (C++ writer vs megatron-core's builder), packing invariants, the training dataset,
collate and blends, all read through megatron-core's own IndexedDataset / BlendedMegatronDatasetBuilder."""

import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_solo._C import IndexWriter
from megatron_solo.data.dataset import BATCH_KEYS, SoloDataset, build_sample, build_train_valid_test_datasets, collate
from megatron_solo.data.indexed import Packer, SoloIndexedDataset, SoloPrefixWriter, pack_segments, prefix_complete
from megatron_solo.spec import ASSISTANT, IMAGE, USER

VPATCH = 32001


# ------------------------------------------------------------------------------ byte identity
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.uint16, np.int64, np.float32])
def test_cpp_writer_is_byte_identical_to_megatron_builder(tmp_path, dtype):
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 200, size=int(n)).astype(dtype) for n in rng.integers(0, 50, size=300)]
    items.append(np.zeros(0, dtype))
    for at in (3, 100, 101, 250):  # items >= 256 KiB bypass the buffer: between small ones, and in a row
        items.insert(at, rng.integers(0, 200, size=(300 << 10) // np.dtype(dtype).itemsize).astype(dtype))
    py_b = IndexedDatasetBuilder(str(tmp_path / "py.bin"), dtype=dtype)
    cpp_b = IndexWriter(str(tmp_path / "cpp.bin"), np.dtype(dtype).str, buffer_bytes=1000)  # force flushes
    for i, x in enumerate(items):
        py_b.add_item(torch.from_numpy(x))
        cpp_b.add_item(x)
        if i % 7 == 6:
            py_b.end_document()
            cpp_b.end_document()
    py_b.end_document()
    cpp_b.end_document()
    py_b.finalize(str(tmp_path / "py.idx"))
    cpp_b.finalize(str(tmp_path / "cpp.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"py{ext}").read_bytes() == (tmp_path / f"cpp{ext}").read_bytes(), ext
    ds = IndexedDataset(str(tmp_path / "cpp"))
    assert len(ds) == len(items)
    assert np.array_equal(ds[5], items[5])


def test_cpp_writer_casts_like_the_builder(tmp_path):
    py_b = IndexedDatasetBuilder(str(tmp_path / "py.bin"), dtype=np.int32)
    cpp_b = IndexWriter(str(tmp_path / "cpp.bin"), "<i4")
    x = np.arange(10, dtype=np.int64)[::2]  # other dtype, not contiguous
    py_b.add_item(torch.from_numpy(x.copy()))
    cpp_b.add_item(x)
    py_b.end_document(), cpp_b.end_document()
    py_b.finalize(str(tmp_path / "py.idx")), cpp_b.finalize(str(tmp_path / "cpp.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"py{ext}").read_bytes() == (tmp_path / f"cpp{ext}").read_bytes()


# ------------------------------------------------------------------------------ packing
def _fake_doc(rng, length, n_img_tokens=0):
    """A document whose tokens spell their position, with some <vpatch> runs (and their patches)."""
    tokens = rng.integers(3, 32000, size=length).astype(np.int32)
    roles = np.full(length, ASSISTANT, np.uint8)
    if n_img_tokens:
        s = int(rng.integers(1, max(2, length - n_img_tokens)))
        tokens[s:s + n_img_tokens] = VPATCH
        roles[s:s + n_img_tokens] = IMAGE
    n = int((tokens == VPATCH).sum())
    patches = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return tokens, roles, patches


def _write(prefix, docs, seq_length, use_cpp=True):
    w = SoloPrefixWriter(str(prefix), use_cpp=use_cpp)
    p = Packer(w, seq_length)
    for d in docs:
        p.add(*d)
    w.finalize({"docs": len(docs)})
    return w


@pytest.mark.parametrize("seq_length", [None, 16, 50])
def test_packing_invariants(tmp_path, seq_length):
    rng = np.random.default_rng(seq_length or 0)
    docs = [_fake_doc(rng, int(n), int(rng.integers(0, 8))) for n in rng.integers(10, 120, size=40)]
    _write(tmp_path / "p", docs, seq_length)
    assert prefix_complete(str(tmp_path / "p"))
    ds = SoloIndexedDataset(str(tmp_path / "p"))
    # megatron-core's reader sees three consistent datasets
    tok = IndexedDataset(str(tmp_path / "p-tokens"))
    assert len(tok) == len(ds.roles) == len(ds.patches)
    # concatenating every pack's segments gives back the documents, in order, patches included
    all_t, all_r, all_p, lens = [], [], [], []
    for i in range(len(ds)):
        segs = ds.pack(i)
        n = sum(len(t) for t, _, _ in segs)
        lens.append(n)
        if seq_length is not None:
            assert n <= seq_length
        for t, r, p in segs:
            assert int((t == VPATCH).sum()) == len(p)  # a segment's patches are its own
            all_t.append(t), all_r.append(r), all_p.append(p)
    assert np.array_equal(np.concatenate(all_t), np.concatenate([d[0] for d in docs]))
    assert np.array_equal(np.concatenate(all_r), np.concatenate([d[1] for d in docs]))
    assert np.array_equal(np.concatenate(all_p), np.concatenate([d[2] for d in docs]))
    if seq_length is None:
        assert len(ds) == len(docs)
    else:
        # greedy: a pack is closed only when the next document does not fit (or it is full)
        assert all(lens[i] + len(docs[0][0]) > 0 for i in range(len(lens)))
        assert len(ds) <= sum(len(d[0]) for d in docs) // 1
        assert sum(lens) == sum(len(d[0]) for d in docs)


def test_pack_segments_rule():
    # doc of 5 into a pack holding 8 of 10: does not fit -> close, start a new pack
    assert list(pack_segments(5, 8, 10)) == [(0, 0, True), (0, 5, False)]
    # a 25-token document: split into 10s, remainder 5 starts the next pack, which stays open
    assert list(pack_segments(25, 0, 10)) == [(0, 10, True), (10, 20, True), (20, 25, False)]
    assert list(pack_segments(2, 8, 10)) == [(0, 2, True)]
    assert list(pack_segments(7, 3, None)) == [(0, 7, True)]


def test_python_and_cpp_prefix_writers_agree(tmp_path):
    rng = np.random.default_rng(3)
    docs = [_fake_doc(rng, int(n), 5) for n in rng.integers(10, 60, size=10)]
    _write(tmp_path / "a", docs, 32, use_cpp=True)
    _write(tmp_path / "b", docs, 32, use_cpp=False)
    for n in ("tokens", "roles", "patches"):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"a-{n}{ext}").read_bytes() == (tmp_path / f"b-{n}{ext}").read_bytes()


# ------------------------------------------------------------------------------ samples
def _two_doc_pack():
    # doc A: user text then assistant text; doc B: an image (2 patches) then assistant text
    ta = np.array([1, 100, 101, 102, 103], np.int32)
    ra = np.array([USER, USER, USER, ASSISTANT, ASSISTANT], np.uint8)
    tb = np.array([1, 32000, VPATCH, VPATCH, 32004, 200, 201], np.int32)
    rb = np.array([ASSISTANT, IMAGE, IMAGE, IMAGE, IMAGE, ASSISTANT, ASSISTANT], np.uint8)
    pb = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)
    return [(ta, ra, np.zeros((0, 3072), np.uint8)), (tb, rb, pb)]


def test_build_sample_fields():
    segs = _two_doc_pack()
    s = build_sample(segs, 16)
    assert s["tokens"].tolist() == [1, 100, 101, 102, 103, 1, 32000, VPATCH, VPATCH, 32004, 200, 201, 0, 0, 0, 0]
    assert s["labels"].tolist() == [100, 101, 102, 103, 0, 32000, VPATCH, VPATCH, 32004, 200, 201, 0, 0, 0, 0, 0]
    # loss on assistant labels < 32000 within a document only
    assert s["loss_mask"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert s["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    assert s["doc_lengths"].tolist() == [5, 7, 4]
    assert s["image_doc_mask"].tolist() == [False] * 5 + [True] * 7 + [False] * 4
    assert torch.equal(s["patches"], torch.from_numpy(segs[1][2]))
    s_user = build_sample(segs, 16, loss_role="user")
    assert s_user["loss_mask"].tolist()[:4] == [1, 1, 0, 0]


def test_build_sample_truncates_patches_with_tokens():
    segs = _two_doc_pack()
    s = build_sample(segs, 8)  # cut after the first <vpatch>
    assert s["tokens"].tolist() == [1, 100, 101, 102, 103, 1, 32000, VPATCH]
    assert s["patches"].shape == (1, 3072) and torch.equal(s["patches"][0], torch.from_numpy(segs[1][2][0]))
    assert s["doc_lengths"].tolist() == [5, 3]
    assert s["labels"].tolist()[-1] == VPATCH  # the label past the cut is read
    s = build_sample(segs, 7)  # the next <vpatch> is only a label: no patch
    assert s["patches"].shape == (0, 3072)


def test_collate_contract():
    segs = _two_doc_pack()
    b = collate([build_sample(segs, 16), build_sample(segs[:1], 16), {"dataset_id": 3, **build_sample(segs[1:], 16)}])
    assert set(b) == set(BATCH_KEYS)
    for k, dt in [("tokens", torch.int64), ("labels", torch.int64), ("loss_mask", torch.float32),
                  ("position_ids", torch.int64), ("doc_lengths", torch.int32), ("image_doc_mask", torch.bool),
                  ("patches", torch.uint8)]:
        assert b[k].dtype == dt, k
    assert b["tokens"].shape == (3, 16)
    assert b["doc_lengths"].tolist() == [[5, 7, 4], [5, 11, 0], [7, 9, 0]]
    assert torch.all(b["doc_lengths"].sum(1) == 16)
    assert b["patches"].shape == (4, 3072)
    assert int((b["tokens"] == VPATCH).sum()) == 4


# ------------------------------------------------------------------------------ datasets, blends
@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefixes")
    out = []
    for k in range(2):
        rng = np.random.default_rng(10 + k)
        docs = [_fake_doc(rng, int(n), int(rng.integers(0, 6))) for n in rng.integers(5, 40, size=60)]
        _write(d / f"p{k}", docs, 32)
        out.append(str(d / f"p{k}"))
    return out


def _check_sample(s, seq_length):
    assert s["tokens"].shape == (seq_length,)
    assert int(s["doc_lengths"].sum()) == seq_length
    assert int((s["tokens"] == VPATCH).sum()) == s["patches"].shape[0]


def test_single_prefix_splits_epochs_determinism(prefixes):
    p = prefixes[0]
    n_packs = len(SoloIndexedDataset(p))
    train, valid, test = build_train_valid_test_datasets(p, "8,1,1", 32, 3 * n_packs, 10, 5, seed=7)
    assert isinstance(train, SoloDataset) and len(train) == 3 * n_packs  # several epochs
    tr = set(train.indices.tolist())
    assert not tr & set(valid.indices.tolist()) and not tr & set(test.indices.tolist())
    # each epoch visits every train pack once
    epoch = len(train.indices)
    assert sorted(train.sample_index[:epoch].tolist()) == sorted(train.indices.tolist())
    assert not np.array_equal(train.sample_index[:epoch], train.sample_index[epoch:2 * epoch])
    again = build_train_valid_test_datasets(p, "8,1,1", 32, 3 * n_packs, 10, 5, seed=7)[0]
    assert np.array_equal(again.sample_index, train.sample_index)
    other = build_train_valid_test_datasets(p, "8,1,1", 32, 3 * n_packs, 10, 5, seed=8)[0]
    assert not np.array_equal(other.sample_index, train.sample_index)
    for i in (0, 5, len(train) - 1):
        s = train[i]
        _check_sample(s, 32)
        for k in BATCH_KEYS:
            assert torch.equal(s[k], again[i][k])


def test_weighted_blend(prefixes, tmp_path):
    data_path = f"0.25 {prefixes[0]} 0.75 {prefixes[1]}"
    train, valid, _ = build_train_valid_test_datasets(data_path, "9,1,0", 24, 400, 20, 0, seed=1,
                                                      path_to_cache=str(tmp_path / "cache"))
    assert isinstance(train, BlendedDataset) and len(train) == 400
    ids = np.array([int(train.dataset_index[i]) for i in range(len(train))])
    assert abs((ids == 1).mean() - 0.75) < 0.02
    b = collate([train[i] for i in range(4)])
    assert set(b) == set(BATCH_KEYS) and b["tokens"].shape == (4, 24)
    assert int((b["tokens"] == VPATCH).sum()) == b["patches"].shape[0]
    assert os.listdir(tmp_path / "cache")  # megatron cached the blend indices
    # separate validation data
    tr, va, te = build_train_valid_test_datasets(prefixes[0], None, 24, 50, 10, None, seed=1,
                                                 valid_data_path=prefixes[1])
    assert tr.dataset_path == prefixes[0] and va.dataset_path == prefixes[1] and te is None


def _build_on_ranks(prefixes, cache):
    import torch.distributed as dist

    from megatron_solo.parallel import initialize_model_parallel

    initialize_model_parallel()
    train, valid, _ = build_train_valid_test_datasets(f"1 {prefixes[0]} 2 {prefixes[1]}", "9,1,0", 32, 64, 8, 0,
                                                      seed=3, path_to_cache=cache)
    dist.barrier()
    return [int(train[i]["tokens"].sum()) for i in range(len(train))]


def test_blend_builds_on_several_ranks(prefixes, tmp_path):
    from megatron_solo.testing.distributed import run_distributed

    results = run_distributed(_build_on_ranks, 2, prefixes, str(tmp_path / "cache"))
    assert results[0] == results[1] and len(results[0]) >= 64
