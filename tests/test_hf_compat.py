"""An export works for the transformers its users have: the oldest supported release (4.45.2) and the
pinned one load it (trust_remote_code), read an image with its processing_solo.py and generate with the
KV cache, with the same answer and the same logits.

The old release is installed once per clone into ``.cache/`` (gitignored) with pip's ``--target`` and
put first on ``PYTHONPATH`` of a subprocess; numpy, torch, safetensors and the rest come from the venv.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_solo.demo.base_tokenizers import pip_target
from tests.conftest import ROOT

PY = sys.executable
# The oldest supported release and the tokenizers / huggingface-hub releases it accepts.
OLDEST = ["transformers==4.45.2", "tokenizers==0.20.3", "huggingface-hub==0.26.5"]
CACHE = os.path.join(ROOT, ".cache", "transformers-4.45.2")


def _oldest_transformers() -> str:
    return pip_target(os.path.basename(CACHE), OLDEST, os.path.join("transformers", "__init__.py"))


@pytest.fixture(scope="module")
def export_and_image(tmp_path_factory):
    from PIL import Image

    from tests.helpers_convert import make_random_solo

    root = tmp_path_factory.mktemp("hf_compat")
    hf_dir = make_random_solo(str(root / "hf"), dtype=torch.float32)
    # A rope base other than Mistral's default: a release that ignored the export's rope_parameters fails.
    cfg_path = os.path.join(hf_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["rope_parameters"]["rope_theta"] = 50000.0
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    image = str(root / "digit.png")
    Image.fromarray((np.random.RandomState(0).rand(48, 40, 3) * 255).astype("uint8")).save(image)
    return hf_dir, image


def _probe(hf_dir, image, out, tmp_path, pythonpath=None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / f"modules_{os.path.basename(out)}"),
               PYTHONWARNINGS="ignore")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    r = subprocess.run([PY, os.path.join(ROOT, "tests", "hf_compat_probe.py"), hf_dir, image, out],
                       capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_oldest_and_pinned_transformers_generate_the_same(export_and_image, tmp_path):
    hf_dir, image = export_and_image
    old_site = _oldest_transformers()
    new = _probe(hf_dir, image, str(tmp_path / "new.json"), tmp_path)
    old = _probe(hf_dir, image, str(tmp_path / "old.json"), tmp_path, pythonpath=old_site)
    assert old["transformers"] == "4.45.2" and old["transformers_file"].startswith(old_site)
    assert new["transformers"] == __import__("transformers").__version__
    assert old["prompt_tokens"] == new["prompt_tokens"]
    assert len(new["answer_ids"]) == 6
    assert old["answer_ids"] == new["answer_ids"] and old["answer"] == new["answer"]
    # The KV cache changes nothing (patches are read by the prefill step only).
    assert new["answer_ids_no_cache"] == new["answer_ids"] and old["answer_ids_no_cache"] == old["answer_ids"]
    np.testing.assert_allclose(old["last_logits"], new["last_logits"], rtol=1e-4, atol=1e-4)
