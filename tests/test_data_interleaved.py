"""Interleaved web corpora read as published: OBELICS-style Parquet and MMC4-style JSONL, images as bytes,
as paths and as mapped URLs; bad input counted by reason; --max-error-rate applies to records and images."""

import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_solo.data.encode import image_block_tokens
from megatron_solo.data.image import target_size
from megatron_solo.data.image_sources import UrlMapError, load_url_map
from megatron_solo.data.indexed import SoloIndexedDataset
from megatron_solo.data.interleaved import InterleavedOptions
from megatron_solo.data.parquet_input import ParquetColumns, ParquetInputError, iter_parquet
from megatron_solo.data.preprocess import PreprocessConfig, TooManyErrors, preprocess
from megatron_solo.spec import PATCH_SIZE
from tests.conftest import PY, ROOT, run_tool
from tests.data_fixtures.helpers import data_url, jpeg_bytes, small_photo, solo_tokenizer, solo_tokenizer_path
from tests.test_data_tools import _tool

IMG = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SIZES = ((96, 64), (64, 96), (70, 40), (40, 70))
URL = "https://example.com/"


def _run(inputs, prefix, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("image_storage", "patches")
    return preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix),
                                       tokenizer_model=solo_tokenizer_path(), **kw))


def _segments(prefix):
    ds = SoloIndexedDataset(str(prefix))
    return [seg for i in range(len(ds)) for seg in ds.pack(i)]


def _expected_tokens(doc) -> list:
    """BOS, then each item in order: a text run as the tokenizer encodes it, an image as its block."""
    tok = solo_tokenizer()
    out = [tok.vocab.bos]
    for kind, value in doc:
        if kind == "text":
            out += tok.encode(value)
        else:
            w, h = target_size(*SIZES[value])
            out += image_block_tokens(h // PATCH_SIZE, w // PATCH_SIZE, tok.vocab).tolist()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("interleaved")
    photos = [jpeg_bytes(small_photo(i, s)) for i, s in enumerate(SIZES)]
    (d / "img").mkdir()
    for i, b in enumerate(photos):
        (d / "img" / f"p{i}.jpg").write_bytes(b)
    (d / "map.tsv").write_text("url\tpath\n" + "".join(f"{URL}p{i}.jpg\tp{i}.jpg\n" for i in range(4)))
    # OBELICS, images as bytes (an HF Image struct) and as a struct's path
    pq.write_table(pa.table({
        "texts": [["Intro paragraph.", None, "After the photo.", "Second paragraph."], [None, "Caption under it."]],
        "images": pa.array([[None, {"bytes": photos[0], "path": None}, None, None],
                            [{"bytes": None, "path": "p1.jpg"}, None]], pa.list_(IMG)),
        "url": ["a", "b"]}), d / "obelics_bytes.parquet", row_group_size=1)
    # OBELICS as published: images as strings, here a path and a URL the map knows
    pq.write_table(pa.table({"texts": [[None, "Between two photos.", None]],
                             "images": [["p2.jpg", None, f"{URL}p3.jpg"]]}), d / "obelics_urls.parquet")
    with open(d / "mmc4.jsonl", "w") as f:
        f.write(json.dumps({"text_list": ["First sentence.", "Second sentence.", "Third sentence."], "image_info": [
            {"image_name": "p0.jpg", "raw_url": f"{URL}unmapped.jpg", "matched_text_index": 2, "matched_sim": 0.31},
            {"image_name": "absent.jpg", "raw_url": f"{URL}p1.jpg", "matched_text_index": 0, "matched_sim": 0.28},
            {"image_name": "p2.jpg", "matched_text_index": 2, "matched_sim": 0.25}]}) + "\n")
        f.write(json.dumps({"text_list": ["Only text here.", "And more."], "image_info": [
            {"image_name": "p3.jpg", "matched_text_index": 1, "matched_sim": 0.1}]}) + "\n")
    # every document as the layouts define it: ("text", run) and ("image", photo number)
    docs = [[("text", "Intro paragraph."), ("image", 0), ("text", "After the photo.\n\nSecond paragraph.")],
            [("image", 1), ("text", "Caption under it.")],
            [("image", 2), ("text", "Between two photos."), ("image", 3)],
            [("image", 1), ("text", "First sentence. Second sentence."), ("image", 0), ("image", 2),
             ("text", "Third sentence.")],
            [("text", "Only text here."), ("text", "And more.")]]  # its image is below the similarity: a run ends
    inputs = [d / "obelics_bytes.parquet", d / "obelics_urls.parquet", d / "mmc4.jsonl"]
    out = run_tool(["tools/preprocess_data.py", "--input", *map(str, inputs), "--output-prefix", str(d / "web"),
                    "--tokenizer-model", solo_tokenizer_path(), "--image-root", str(d / "img"),
                    "--image-url-map", str(d / "map.tsv"), "--min-image-similarity", "0.2", "--seq-length", "8192",
                    "--workers", "2", "--image-storage", "patches", "--no-progress"])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    # the same documents (the four without a dropped image) in the project's own JSONL, images as data URLs
    with open(d / "ref.jsonl", "w") as f:
        for doc in docs[:4]:
            parts = [{"type": "text", "text": v} if k == "text" else
                     {"type": "image_url", "image_url": {"url": data_url(photos[v])}} for k, v in doc]
            f.write(json.dumps([{"role": "assistant", "content": parts}]) + "\n")
    _run([d / "ref.jsonl"], d / "ref")
    return d, inputs, docs, summary, photos


def test_layouts_give_the_documents_in_their_order_with_the_jsonl_patches(corpus, capsys):
    d, inputs, docs, summary, _ = corpus
    assert (summary["records"], summary["documents"], summary["images"], summary["skipped"]) == (5, 5, 7, {})
    assert summary["images_dropped"] == {"below_min_similarity": 1}
    assert summary["documents_all_images_dropped"] == 1 and summary["packs"] == 1
    # tools/inspect_data.py --json, in this process (its own would spend seconds importing torch)
    assert _tool("inspect_data").main(["--prefix", str(d / "web"), "--index", "0", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    expected = [_expected_tokens(doc) for doc in docs]
    assert shown["doc_lengths"][:5] == [len(e) for e in expected]
    assert shown["tokens"][:sum(map(len, expected))] == [t for e in expected for t in e]
    web, ref = _segments(d / "web"), _segments(d / "ref")
    assert len(web) == 5 and len(ref) == 4
    for a, b in zip(web, ref):  # tokens, roles and patches byte for byte
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # sharded (the same worker machinery, one process here): the same segments
    s = _run(inputs, d / "sharded", shard_size=2, seq_length=8192, image_root=str(d / "img"),
             interleaved=InterleavedOptions(0.2, load_url_map(str(d / "map.tsv"))))
    assert s["documents"] == 5 and s["images_dropped"] == {"below_min_similarity": 1}
    sharded = [seg for p in s["shards"] for seg in _segments(p)]
    assert all(np.array_equal(x, y) for a, b in zip(web, sharded) for x, y in zip(a, b))


def test_bad_input_is_counted_by_reason_and_the_error_rate_applies(corpus, tmp_path):
    d, _, _, _, photos = corpus
    pq.write_table(pa.table({
        "texts": [["both"], ["neither", None], ["Kept text.", None], [None, "Text after a broken image."],
                  ["Fine.", None]],
        "images": pa.array([[{"bytes": photos[0], "path": None}], [None, None],
                            [None, {"bytes": None, "path": f"{URL}unknown.jpg"}],
                            [{"bytes": b"\xff\xd8 not a jpeg", "path": None}, None],
                            [None, {"bytes": photos[1], "path": None}]], pa.list_(IMG))}), tmp_path / "bad.parquet")
    with open(tmp_path / "bad.jsonl", "w") as f:
        for doc in ({"text_list": ["a"], "image_info": [{"image_name": "p0.jpg", "matched_text_index": 3}]},
                    {"text_list": [" "], "image_info": [{"raw_url": f"{URL}nowhere.jpg", "matched_text_index": 0}]},
                    {"text_list": ["Good."], "image_info": [{"image_name": "p1.jpg", "matched_text_index": 0}]}):
            f.write(json.dumps(doc) + "\n")
    inputs = [tmp_path / "bad.parquet", tmp_path / "bad.jsonl"]
    kw = dict(image_root=str(d / "img"), interleaved=InterleavedOptions(url_map=load_url_map(str(d / "map.tsv"))))
    s = _run(inputs, tmp_path / "bad", max_error_rate=0.6, **kw)
    assert (s["records"], s["documents"], s["images"]) == (8, 4, 2)
    assert s["skipped"] == {"bad_row": 2, "image_index_out_of_range": 1, "empty_document": 1}
    assert s["images_dropped"] == {"image_not_local": 2, "corrupt_image": 1}
    assert s["documents_all_images_dropped"] == 2
    with pytest.raises(TooManyErrors, match="4 of 8 records skipped"):
        _run(inputs, tmp_path / "strict", max_error_rate=0.3, **kw)
    # records within the rate (2 of 5 skipped), images not (2 of 3 left out): the images' own rate
    with pytest.raises(TooManyErrors, match="2 images of interleaved documents left out .66.67%"):
        _run([tmp_path / "bad.parquet"], tmp_path / "images", max_error_rate=0.45, image_root=str(d / "img"))
    # the tool: one error: line, exit 1, never a traceback
    r = subprocess.run([PY, "tools/preprocess_data.py", "--input", *map(str, inputs), "--output-prefix",
                        str(tmp_path / "cli"), "--tokenizer-model", solo_tokenizer_path(), "--image-root",
                        str(d / "img"), "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: 4 of 8 records skipped")
    pq.write_table(pa.table({"images": [["a.jpg"]]}), tmp_path / "no_texts.parquet")
    with pytest.raises(ParquetInputError, match="layout interleaved needs a texts and an images column"):
        list(iter_parquet(str(tmp_path / "no_texts.parquet"), ParquetColumns("interleaved")))
    (tmp_path / "bad_map.jsonl").write_text('{"url": "https://x/1.jpg"}\n')
    with pytest.raises(UrlMapError, match="needs a url and a local path"):
        load_url_map(str(tmp_path / "bad_map.jsonl"))
    (tmp_path / "map.jsonl").write_text('{"url": "https://x/1.jpg", "path": "a/1.jpg"}\n\nhttps://x/2.jpg\tb.jpg\n')
    assert load_url_map(str(tmp_path / "map.jsonl")) == {"https://x/1.jpg": "a/1.jpg", "https://x/2.jpg": "b.jpg"}
