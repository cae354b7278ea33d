"""--row-separator on|off (SOLO's image layout or SAIL's) and each patch's (row, col): the layout against
SOLO's token layout, the coordinates against the images' grids across a pack that cuts an image (both image
storages, both loader paths), the layout in P.stats.json, merges, blends, checkpoints and the export's
processor."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_solo.data.dataset import build_train_valid_test_datasets, collate
from megatron_solo.data.encode import DocumentEncoder, Message
from megatron_solo.data.image import target_size
from megatron_solo.data.indexed import SoloIndexedDataset
from megatron_solo.data.merge import merge_prefixes
from megatron_solo.data.patch_coords import starts_inside_image
from megatron_solo.data.preprocess import PreprocessConfig, preprocess
from megatron_solo.data.stats import LayoutMismatch, blend_row_separator, prefix_row_separator
from megatron_solo.errors import InputError
from megatron_solo.spec import MISTRAL_VOCAB as V
from tests.data_fixtures.helpers import data_url, jpeg_bytes, png_bytes, small_photo, solo_tokenizer, solo_tokenizer_path

SEQ = 40  # cuts the 7x5 image (41 tokens with separators, 37 without) and some documents across packs
# (width, height) of each document's images: grids 5x7, 3x4, 3x2, 2x10, 5x7 (rows x cols)
DOCS = [["a red house", (200, 130), "by the river"],
        [(100, 60), "two photos", (40, 90)],
        ["a wide one", (300, 40), "then", (200, 130), "the end"]]
LAYOUTS = {("patches", True): "pat_on", ("encoded", True): "enc_on", ("encoded", False): "enc_off"}


def _image(k, size):
    return small_photo(k, size)


def _grid(size):
    w, h = target_size(*size)
    return h // 32, w // 32


def _reference_coords():
    """Every patch's (row, col) in its image, in document order: row-major over each image's grid."""
    out = []
    for doc in DOCS:
        for part in doc:
            if isinstance(part, tuple):
                rows, cols = _grid(part)
                out += [(r, c) for r in range(rows) for c in range(cols)]
    return np.array(out, dtype=np.int64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("rowsep")
    with open(d / "c.jsonl", "w") as f:
        for i, doc in enumerate(DOCS):
            parts = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(_image(k, p)), "image/png")}}
                     if isinstance(p, tuple) else {"type": "text", "text": p} for k, p in enumerate(doc)]
            f.write(json.dumps([{"role": "assistant", "content": parts}]) + "\n")
    out = {}
    for (storage, sep), name in LAYOUTS.items():
        out[name] = str(d / name)
        preprocess(PreprocessConfig(inputs=[str(d / "c.jsonl")], output_prefix=out[name], seq_length=SEQ,
                                    tokenizer_model=solo_tokenizer_path(), image_storage=storage, row_separator=sep,
                                    progress=False))
    out["dir"] = d
    return out


def _spec_block(rows, cols, separators):
    """docs/DATA_FORMAT.md "Token layout", with or without the <vrow_sep> between rows."""
    block = [V.vision_start]
    for r in range(rows):
        if r and separators:
            block.append(V.vision_row_sep)
        block += [V.vision_patch] * cols
    return block + [V.vision_end]


def test_layout_off_is_solo_layout_without_row_separators(tmp_path):
    """Every image block of a document equals SPEC's layout (on) and SPEC's minus the separators (off);
    text, roles and patches are the same either way."""
    paths, msgs_parts = [], []
    for k, part in enumerate(DOCS[2]):
        if isinstance(part, tuple):
            paths.append(str(tmp_path / f"{k}.png"))
            _image(k, part).save(paths[-1])
            msgs_parts.append(("image", paths[-1]))
        else:
            msgs_parts.append(("text", part))
    msgs = [Message("user", [("text", "Look:"), msgs_parts[1]]), Message("assistant", msgs_parts)]
    for fmt in ("pretrain", "chat"):
        on, off = (DocumentEncoder(solo_tokenizer(), fmt=fmt, row_separator=s).encode(msgs) for s in (True, False))
        want, blocks = [], 0
        toks = on.tokens.tolist()
        i = 0
        while i < len(toks):  # SOLO's blocks replaced by SAIL's, built here from the grids
            if toks[i] != V.vision_start:
                want.append(toks[i])
                i += 1
                continue
            size = [(300, 40), (300, 40), (200, 130)][blocks]  # the user's image, then the assistant's two
            rows, cols = _grid(size)
            assert toks[i:i + len(_spec_block(rows, cols, True))] == _spec_block(rows, cols, True)
            want += _spec_block(rows, cols, False)
            i += len(_spec_block(rows, cols, True))
            blocks += 1
        assert blocks == 3 and off.tokens.tolist() == want
        assert V.vision_row_sep not in off.tokens.tolist()
        assert np.array_equal(off.patches, on.patches) and off.n_images == on.n_images == 3
        assert np.array_equal(off.roles, np.delete(on.roles, np.flatnonzero(on.tokens == V.vision_row_sep)))
        assert off.grids == on.grids == tuple(_grid(size) for size in [(300, 40), (300, 40), (200, 130)])
    # evaluation scores an option as a training sample of the model's layout, coordinates included
    from megatron_solo.eval.options import OptionEncoder

    for sep in (True, False):
        enc = OptionEncoder(solo_tokenizer_path(), row_separator=sep)
        doc = enc.encode_answer([paths[1], paths[0]], "Which is wider?", "The first.")
        s = enc.sample(doc, len(doc.tokens) - 1)
        assert (V.vision_row_sep in s["tokens"].tolist()) is sep
        want = [[r, c] for size in [(200, 130), (300, 40)] for r in range(_grid(size)[0]) for c in range(_grid(size)[1])]
        assert s["patch_coords"].tolist() == want


def test_patch_coords_follow_the_grids_across_packs_in_both_storages_and_loaders(corpus):
    from megatron_solo.data.loader import WorkerBatchStream, micro_batch_indices

    want = _reference_coords()
    for name in LAYOUTS.values():
        ds = SoloIndexedDataset(corpus[name])
        packs = [ds.pack(i, with_coords=True) for i in range(len(ds))]
        segs = [s for p in packs for s in p]
        got = np.concatenate([c for _, _, _, c in segs])
        assert got.dtype == np.int64 and np.array_equal(got, want), name
        assert sum(len(p) for _, _, p, _ in segs) == len(want)
        # packing cut an image: a pack opens inside it (and the 5x7 image spans three segments with separators)
        assert any(starts_inside_image(p[0][0], V) for p in packs[1:]), name
        # the training samples: each pack's first seq_length tokens, their patches' coordinates
        train = build_train_valid_test_datasets(corpus[name], "1,0,0", SEQ, len(ds), 0, 0)[0]
        for k in range(len(train)):
            s = train[k]
            pack = packs[int(train.sample_index[k])]
            n = s["patches"].shape[0]
            assert s["patch_coords"].shape == (n, 2)
            assert torch.equal(s["patch_coords"], torch.from_numpy(np.concatenate([c for *_, c in pack])[:n]))
    # tools/visualize_patches.py puts SAIL's rows back from the coordinates: SOLO's token stream again
    from tests.test_data_tools import _tool

    vis = _tool("visualize_patches")
    on_ds, off_ds = SoloIndexedDataset(corpus["enc_on"]), SoloIndexedDataset(corpus["enc_off"])
    marked = [vis.rows_marked(t, c, V) for i in range(len(off_ds)) for t, _, _, c in off_ds.pack(i, with_coords=True)]
    assert np.array_equal(np.concatenate(marked), np.concatenate([t for i in range(len(on_ds)) for t, *_ in on_ds.pack(i)]))
    shapes = []
    for i in range(len(off_ds)):
        assert vis.main(["--prefix", corpus["enc_off"], "--pack", str(i), "--tokenizer-model", solo_tokenizer_path(),
                         "--out", str(corpus["dir"] / f"v{i}.png")]) == 0
        segs = off_ds.pack(i, with_coords=True)
        shapes += [im.shape for im in vis.render(np.concatenate([vis.rows_marked(t, c, V) for t, _, _, c in segs]),
                                                 np.concatenate([p for _, _, p, _ in segs]), gap=0)]
    assert (96, 128, 3) in shapes and (96, 64, 3) in shapes  # the 3x4 and 3x2 images as grids, not one row
    # the DataLoader workers give the in-process batches (SAIL's layout; SOLO's: tests/test_data_storage.py)
    off = build_train_valid_test_datasets(corpus["enc_off"], "1,0,0", SEQ, 8, 0, 0)[0]
    stream = WorkerBatchStream(off, global_batch_size=2, micro_batch_size=2, num_microbatches=1, dp=1, dp_rank=0,
                               consumed=0, num_workers=1)
    try:
        for step in range(2):
            (batch,) = stream.global_step()
            ref = collate([off[i] for i in micro_batch_indices(2 * step, 0, 2, 1, 0, len(off))])
            assert set(batch) == set(ref) and "patch_coords" in batch
            for key in ref:
                assert torch.equal(batch[key], ref[key]), key
    finally:
        stream.close()


def test_layout_in_stats_merges_and_blends(corpus, tmp_path, capsys):
    from megatron_solo import train

    on, off = corpus["enc_on"], corpus["enc_off"]
    assert json.load(open(on + ".stats.json"))["row_separator"] is True
    assert json.load(open(off + ".stats.json"))["row_separator"] is False
    assert (prefix_row_separator(on), prefix_row_separator(off)) == (True, False)
    old = str(tmp_path / "old")  # written before the layout was recorded: SOLO's
    stats = json.load(open(off + ".stats.json"))
    del stats["row_separator"]
    json.dump(stats, open(old + ".stats.json", "w"))
    assert prefix_row_separator(old) is True
    # a merge keeps the layout, refuses two
    assert merge_prefixes([off, off], str(tmp_path / "m_off"))["row_separator"] is False
    assert SoloIndexedDataset(str(tmp_path / "m_off")).row_separator is False
    with pytest.raises(LayoutMismatch, match="--row-separator on.*--row-separator off"):
        merge_prefixes([on, off], str(tmp_path / "m_mixed"))
    assert not os.path.exists(str(tmp_path / "m_mixed") + "-tokens.idx")
    # a text-only prefix takes either layout
    text = str(tmp_path / "text")
    with open(tmp_path / "t.jsonl", "w") as f:
        f.write(json.dumps([{"role": "assistant", "content": "only words here"}]) + "\n")
    preprocess(PreprocessConfig(inputs=[str(tmp_path / "t.jsonl")], output_prefix=text, seq_length=SEQ,
                                tokenizer_model=solo_tokenizer_path(), progress=False))
    assert blend_row_separator([text, off]) is False and blend_row_separator([on, text]) is True
    # a training blend of both layouts: one error line, exit 2, before anything is built
    capsys.readouterr()
    rc = train.main(["--model", "tiny", "--seq-length", str(SEQ), "--train-iters", "1", "--global-batch-size", "1",
                     "--data-path", on, "--valid-data-path", off, "--tokenizer-model", solo_tokenizer_path()])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: the run's data (--data-path, --valid-data-path) mixes image layouts"), err
    with pytest.raises(LayoutMismatch):
        build_train_valid_test_datasets(f"0.5 {on} 0.5 {off}", "1,0,0", SEQ, 2, 0, 0)
    # preprocessing refuses SAIL's layout in patches storage (its tokens could not give the grids back)
    with pytest.raises(InputError, match="--row-separator off needs --image-storage encoded"):
        preprocess(PreprocessConfig(inputs=[str(tmp_path / "t.jsonl")], output_prefix=str(tmp_path / "x"),
                                    tokenizer_model=solo_tokenizer_path(), image_storage="patches",
                                    row_separator=False))


def test_checkpoint_records_the_layout_and_a_resume_onto_the_other_is_refused(corpus, tmp_path, monkeypatch):
    from megatron_solo.training.arguments import ArgumentError, build_parser
    from megatron_solo.training.config import build_train_config
    from tests.test_first_hour import _fake_complete_checkpoint

    monkeypatch.setenv("WORLD_SIZE", "1")
    flags = ["--model", "tiny", "--seq-length", str(SEQ), "--train-iters", "4", "--global-batch-size", "1"]
    cfg = build_train_config(build_parser().parse_args(flags + ["--data-path", corpus["enc_off"]]))
    assert cfg.data.row_separator is False and cfg.checkpoint_args()["row_separator"] is False
    assert build_train_config(build_parser().parse_args(flags + ["--data-path", corpus["enc_on"]])
                              ).checkpoint_args()["row_separator"] is True
    _fake_complete_checkpoint(tmp_path / "ck", 2, gbs=1)  # saved before layouts were recorded: SOLO's
    resume = flags + ["--data-path", corpus["enc_off"], "--load", str(tmp_path / "ck")]
    with pytest.raises(ArgumentError, match="--row-separator off, the run in .* trained on --row-separator on"):
        build_train_config(build_parser().parse_args(resume))
    ft = build_train_config(build_parser().parse_args(resume + ["--finetune"]))
    assert "the data is laid out with --row-separator off; the checkpoint" in ft.resume.note


def test_export_and_processor_lay_images_out_as_the_data(corpus, tmp_path):
    """The exported processor gives the preprocessor's ids and coordinates for the same images and text, in
    both layouts; the layout reaches config.json and processor_config.json only when it is not SOLO's."""
    from transformers import AutoConfig

    from megatron_solo.checkpoint import checkpoint_row_separator
    from megatron_solo.convert.hf_config import hf_config_from_model_args, model_args_from_hf_config
    from megatron_solo.convert.hf_export_files import write_hf_support_files
    from megatron_solo.convert.hf_files.processing_solo import SoloProcessor
    from tests.helpers_convert import mistral_config

    assert checkpoint_row_separator({"args": {"row_separator": False}}) is False
    assert checkpoint_row_separator({"args": {"converted_from": "/base"}}) is None  # a base saw no image
    args = model_args_from_hf_config(mistral_config().to_dict())
    assert "vision_row_separator" not in hf_config_from_model_args(args)  # SOLO's: as exported before
    for sep in (True, False):
        out = str(tmp_path / f"hf_{sep}")
        os.makedirs(out)
        write_hf_support_files(out, hf_config_from_model_args(args, row_separator=sep), solo_tokenizer_path(),
                               row_separator=sep)
        assert AutoConfig.from_pretrained(out, trust_remote_code=True).vision_row_separator is sep
        proc = SoloProcessor.from_pretrained(out)
        assert proc.row_separator is sep and "vision_patch_coords" not in proc([_image(0, (100, 60))])
        proc.save_pretrained(str(tmp_path / f"again_{sep}"))
        assert SoloProcessor.from_pretrained(str(tmp_path / f"again_{sep}")).row_separator is sep
        # the preprocessor's documents and coordinates (the prefix of this layout, encoded storage)
        ds = SoloIndexedDataset(corpus["enc_on" if sep else "enc_off"])
        tokens = np.concatenate([t for i in range(len(ds)) for t, *_ in ds.pack(i)])
        coords = np.concatenate([c for i in range(len(ds)) for *_, c in ds.pack(i, with_coords=True)])
        got_ids, got_coords = [], []
        for doc in DOCS:
            parts = [_image(k, p) if isinstance(p, tuple) else p for k, p in enumerate(doc)]
            x = proc(parts, return_patch_coords=True)
            got_ids += x["input_ids"][0].tolist()
            got_coords.append(x["vision_patch_coords"])
            assert x["vision_patch_coords"].dtype == torch.long
            assert x["vision_patches"].shape[0] == x["vision_patch_coords"].shape[0]
        assert got_ids == tokens.tolist()
        assert torch.equal(torch.cat(got_coords), torch.from_numpy(coords))
    # an export whose model takes 2D positions: its processor returns the coordinates without being asked
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**cfg, "image_positions": "mrope"}, f)
    x = SoloProcessor.from_pretrained(out)([_image(0, (100, 60))])
    assert x["vision_patch_coords"].tolist() == [[r, c] for r in range(3) for c in range(4)]
