""".parquet input: the three Hugging Face layouts, bad rows and unreadable row groups counted, layout errors."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_solo.data.indexed import SoloIndexedDataset
from megatron_solo.data.parquet_input import ParquetColumns, ParquetInputError, iter_parquet
from megatron_solo.data.preprocess import PreprocessConfig, preprocess
from tests.data_fixtures.helpers import data_url, jpeg_bytes, png_bytes, small_photo, solo_tokenizer_path

IMG = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _run(inputs, prefix, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("max_error_rate", 0.5)
    return preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix),
                                       tokenizer_model=solo_tokenizer_path(), **kw))


def _docs(prefix):
    ds = SoloIndexedDataset(str(prefix))
    return [tuple(np.concatenate(x) for x in zip(*ds.pack(i))) for i in range(len(ds))]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(np.array_equal(u, v) for u, v in zip(x, y))


def test_llava_layout_matches_the_same_records_as_json(tmp_path):
    imgs = [jpeg_bytes(small_photo(i)) for i in range(5)]
    convs = [[{"from": "human", "value": f"<image>\nWhat is in photo {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]
             for i in range(5)]
    table = pa.table({"image": pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(imgs)], IMG),
                      "conversations": convs, "id": [str(i) for i in range(5)]})
    pq.write_table(table, tmp_path / "llava.parquet", row_group_size=2)  # 3 row groups
    with open(tmp_path / "llava.jsonl", "w") as f:
        for b, c in zip(imgs, convs):
            f.write(json.dumps({"image": data_url(b), "conversations": c}) + "\n")
    sp = _run([tmp_path / "llava.parquet"], tmp_path / "pq", fmt="chat")
    _run([tmp_path / "llava.jsonl"], tmp_path / "js", fmt="chat")
    assert sp["documents"] == 5 and sp["images"] == 5
    _same(_docs(tmp_path / "pq"), _docs(tmp_path / "js"))


def test_chat_and_caption_layouts_with_bad_rows_counted(tmp_path):
    a, b = png_bytes(small_photo(1)), jpeg_bytes(small_photo(2))
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    msg = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    chat = pa.table({
        "messages": pa.array([
            [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Describe."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Two photos."}, {"type": "image", "text": None}]}],
            [{"role": "user", "content": [{"type": "text", "text": "No image here."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Fine."}]}],
            [{"role": "user", "content": [{"type": "image", "text": None}]}],  # bad: placeholder, no image
        ], pa.list_(msg)),
        "images": pa.array([[{"bytes": a, "path": None}, {"bytes": b, "path": None}], [], []], pa.list_(IMG)),
    })
    pq.write_table(chat, tmp_path / "chat.parquet")
    s = _run([tmp_path / "chat.parquet"], tmp_path / "chat", fmt="chat")
    assert (s["records"], s["documents"], s["images"], s["skipped"]) == (3, 2, 2, {"bad_row": 1})
    ref = tmp_path / "chat.jsonl"
    ref.write_text(json.dumps([
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(a, "image/png")}},
                                     {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two photos."},
                                          {"type": "image_url", "image_url": {"url": data_url(b)}}]}]) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "No image here."},
                                   {"role": "assistant", "content": "Fine."}]}) + "\n")
    _run([ref], tmp_path / "chat_js", fmt="chat")
    _same(_docs(tmp_path / "chat"), _docs(tmp_path / "chat_js"))

    cap = pa.table({"image": [a, b, b"not an image", b], "caption": ["one", "two", "three", None]})
    pq.write_table(cap, tmp_path / "cap.parquet", row_group_size=2)
    s = _run([tmp_path / "cap.parquet"], tmp_path / "cap", image_storage="encoded")
    assert (s["documents"], s["skipped"]) == (2, {"bad_row": 1, "corrupt_image": 1})


def test_unreadable_row_group_is_counted_and_layout_errors_are_one_line(tmp_path):
    cap = pa.table({"image": [png_bytes(small_photo(i)) for i in range(6)], "text": [f"t{i}" for i in range(6)]})
    path = tmp_path / "cap.parquet"
    pq.write_table(cap, path, row_group_size=3, compression="snappy", use_dictionary=False)
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    raw = bytearray(path.read_bytes())
    start = col.data_page_offset
    raw[start + 20:start + 220] = b"\xff" * 200  # garble the second row group's image page
    path.write_bytes(bytes(raw))
    items = list(iter_parquet(str(path)))
    kinds = [k for _, k, _ in items]
    assert len(items) == 6 and kinds[:3] == ["parquet"] * 3 and kinds[3:] == ["bad"] * 3
    assert items[3][2][0] == "bad_row" and items[3][0].endswith(":row3")

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1], "b": ["x"]}), other)
    with pytest.raises(ParquetInputError, match="cannot tell the layout"):
        list(iter_parquet(str(other)))
    with pytest.raises(ParquetInputError, match="no column 'caption'"):
        list(iter_parquet(str(other), ParquetColumns("caption", image="a", text="caption")))
    r = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(other), "--output-prefix",
                        str(tmp_path / "o"), "--tokenizer-model", solo_tokenizer_path(), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
