"""The mixture arithmetic of tools/data_mixture.py (megatron_solo.data.mixture) and tools/visualize_patches.py."""

import importlib.util
import json
import os

import numpy as np
from PIL import Image

from megatron_solo.data.image import resize_for_patches
from megatron_solo.data.preprocess import PreprocessConfig, preprocess
from tests.data_fixtures.helpers import data_url, png_bytes, small_photo, solo_tokenizer_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mixture_arithmetic():
    from megatron_solo.data.mixture import compute_mixture

    # source A: 100 packs of 1000 tokens; B: 50 packs of 4000 tokens; want 50/50 tokens
    plan = compute_mixture([0.5, 0.5], [{"packs": 100, "tokens": 100_000}, {"packs": 50, "tokens": 200_000}], 10)
    wa, wb = plan["weights"]
    assert abs(wa - 0.8) < 1e-9 and abs(wb - 0.2) < 1e-9  # 4x more A samples for equal tokens
    assert plan["samples_per_epoch"] == 250 and plan["samples_per_source"] == [200, 50]
    assert plan["iterations_per_epoch"] == 25
    tokens = [s * t for s, t in zip(plan["samples_per_source"], plan["tokens_per_sample"])]
    assert abs(tokens[0] / sum(tokens) - 0.5) < 1e-9


def test_visualize_shows_the_resized_image(tmp_path, capsys):
    img = small_photo(2, (70, 45))
    (tmp_path / "c.jsonl").write_text(json.dumps([{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(img), "image/png")}},
        {"type": "text", "text": "a bridge"}]}]) + "\n")
    preprocess(PreprocessConfig(inputs=[str(tmp_path / "c.jsonl")], output_prefix=str(tmp_path / "p"),
                                tokenizer_model=solo_tokenizer_path(), progress=False))
    vis = _tool("visualize_patches")
    assert vis.main(["--prefix", str(tmp_path / "p"), "--tokenizer-model", solo_tokenizer_path(),
                     "--out", str(tmp_path / "v.png")]) == 0
    out = capsys.readouterr().out
    assert "a bridge" in out and "[IMAGE ]" in out
    from megatron_solo.data.indexed import SoloIndexedDataset

    segs = SoloIndexedDataset(str(tmp_path / "p")).pack(0)
    grid = vis.render(segs[0][0], segs[0][2], gap=0)[0]
    assert np.array_equal(grid, np.asarray(resize_for_patches(img)))
    assert Image.open(tmp_path / "v.png").size[0] >= grid.shape[1]


def test_visualize_patches_reads_both_image_closers():
    """chatml/pretrain blocks close with </vision>; solo-inst blocks close with <vision> (SOLO's SFT code)."""
    from megatron_solo.data.encode import image_block_tokens
    from megatron_solo.spec import SOLO_IDS

    vis = _tool("visualize_patches")
    block = [int(t) for t in image_block_tokens(2, 3)]
    solo_block = block[:-1] + [SOLO_IDS.vision_start]
    patches = np.random.default_rng(0).integers(0, 256, (12, 3072), dtype=np.uint8)
    for tokens in ([1, 5] + block + [7] + block, solo_block + [1, 9] + solo_block):
        images = vis.render(tokens, patches, gap=0)
        assert [im.shape for im in images] == [(64, 96, 3), (64, 96, 3)]
        assert not np.array_equal(images[0], images[1])  # the second block took the next 6 patches

    class Pieces:
        def id_to_piece(self, i):
            return "x"

    kinds = [k for k, _ in vis._document_elements(solo_block + [1, 9] + solo_block, Pieces())]
    assert kinds == ["image", "text", "image"]
