"""Every test goes through megatron-core's workarounds and the CPU backend (a no-op on a GPU machine):
this fixture module is the suite's entry point, so it makes the two explicit calls (the workarounds first:
one of them must precede megatron-core's import)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.chdir(ROOT)  # tools/ and examples/ are addressed relative to the repository root
os.environ.setdefault("OMP_NUM_THREADS", "2")

from megatron_solo import cpu_backend, mcore_fixes  # noqa: E402

mcore_fixes.apply()
cpu_backend.ensure()


import subprocess  # noqa: E402

import pytest  # noqa: E402

PY = sys.executable


def run_tool(args, **kw):
    """Run a tools/ script or module with this interpreter; raise with its output on failure."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([PY, *args], capture_output=True, text=True, env=env, cwd=ROOT, **kw)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


@pytest.fixture
def plain_torch():
    """The test runs on plain torch (third-party reference models: transformers), not on the CPU backend."""
    with cpu_backend.suspended():
        yield


@pytest.fixture(scope="session")
def solo_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("solo_tok")
    run_tool(["tools/create_solo_tokenizer.py", "--base", "mistral-common", "--output", str(out)])
    return str(out / "tokenizer.model")


@pytest.fixture(scope="session")
def hf_tokenizers(tmp_path_factory):
    """Real Qwen3 and Llama-3.2 tokenizer.json bases and SOLO's tokenizers over them (tests/helpers_tokenizers.py)."""
    from tests.helpers_tokenizers import solo_hf_tokenizers

    return solo_hf_tokenizers(str(tmp_path_factory.mktemp("hf_tok")))


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory, solo_tokenizer):
    """The demo's real corpora (scikit-learn digits), preprocessed with the real tool, packed to 128."""
    root = tmp_path_factory.mktemp("digits")
    run_tool(["tools/make_digits_corpus.py", "--output", str(root / "corpus")])
    prefixes = {}
    for name, fmt in (("pretrain", "pretrain"), ("sft", "chat")):
        prefix = str(root / "data" / name)
        run_tool(["tools/preprocess_data.py", "--input", str(root / "corpus" / f"{name}.jsonl"),
                  "--output-prefix", prefix, "--tokenizer-model", solo_tokenizer, "--format", fmt,
                  "--seq-length", "128", "--image-root", str(root / "corpus"), "--no-progress"])
        prefixes[name] = prefix
    return {"root": str(root), "tokenizer": solo_tokenizer, **prefixes}
