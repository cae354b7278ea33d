"""The commands in README.md and docs/ work as printed: every ```bash block right after a
``<!-- tested -->`` line is run verbatim, in a fresh directory shaped like the repository (``.venv``,
``examples/``, ``tools/`` linked in), with ``set -euo pipefail``."""

import glob
import os
import re
import stat
import subprocess

import pytest

from megatron_solo.netutil import free_port
from tests.conftest import ROOT

MARK = "<!-- tested -->"


def marked_blocks() -> list[tuple[str, str]]:
    """(``file:line``, bash text) of every marked block."""
    blocks = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        text = open(path).read()
        for m in re.finditer(re.escape(MARK) + r"\s*\n```bash\n(.*?)\n```", text, flags=re.S):
            line = text[:m.start()].count("\n") + 1
            blocks.append((f"{os.path.relpath(path, ROOT)}:{line}", m.group(1)))
    return blocks


BLOCKS = marked_blocks()


def test_the_docs_mark_blocks_to_test():
    assert any(where.startswith("docs/TRAINING.md") for where, _ in BLOCKS), BLOCKS


@pytest.mark.parametrize("where,script", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_marked_doc_block_runs_as_printed(where, script, tmp_path):
    for name in (".venv", "examples", "tools"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PRESET", "PYTHON")}
    env.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "-c", "set -euo pipefail\numask 022\n" + script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{where} failed ({r.returncode}):\n{out[-6000:]}"
    assert "Traceback" not in out and "Warning:" not in out, out[-6000:]
    if "megatron-to-hf" in script:  # the export is shared like any directory, not 0700
        hf = next(p for p in tmp_path.rglob("config.json") if (p.parent / "modeling_solo.py").exists()).parent
        assert stat.S_IMODE(os.stat(hf).st_mode) == 0o755


def test_the_recipe_quoted_in_training_md_is_the_launchers():
    """docs/TRAINING.md quotes examples/stage2_pretrain.sh's recipe arrays: every line it shows is in the script."""
    doc = open(os.path.join(ROOT, "docs", "TRAINING.md")).read()
    m = re.search(r"`examples/stage2_pretrain\.sh`:\n```bash\n(.*?)\n```", doc, flags=re.S)
    assert m, "docs/TRAINING.md no longer quotes examples/stage2_pretrain.sh"
    script = open(os.path.join(ROOT, "examples", "stage2_pretrain.sh")).read().splitlines()
    shown = [line for line in m.group(1).splitlines() if line.strip() != "..."]
    assert len(shown) > 10 and [line for line in shown if line not in script] == []


def test_the_docs_stand_alone():
    """README.md and docs/ name only what the repository holds: every relative link and every repository
    file they name (`tools/x.py`, `docs/X.md`, `megatron_solo/.../y.py`, ...) exists, and none points at the
    maintainers' notes outside the repository (`../shared`, SOLO_SPEC.md): the facts live in docs/ itself."""
    missing, outside = [], []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        text, where = open(path).read(), os.path.relpath(path, ROOT)
        outside += [f"{where}: {m}" for m in re.findall(r"\.\./shared\S*|SOLO_SPEC\.md|DESIGN\.md", text)]
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in link and not os.path.exists(os.path.join(os.path.dirname(path), link)):
                missing.append(f"{where}: link {link}")
        for name in re.findall(r"(?<![\w./-])((?:docs|examples|tools|megatron_solo|benchmarks|tests|csrc)/"
                               r"[\w./-]*\.(?:md|py|sh|awk|txt|json|png|cpp|h))(?![\w*])", text):
            if not os.path.exists(os.path.join(ROOT, name)):
                missing.append(f"{where}: {name}")
    assert (missing, outside) == ([], [])
