"""lmms-eval evaluates a SOLO export through the model ``megatron_solo`` this package registers with lmms-eval's
plugin entry point, and gets tools/evaluate.py's answers and scores on the same samples.

The released lmms-eval (0.7.3) is installed once per clone into ``.cache/`` (gitignored) with pip's
``--target --no-deps``, with exactly the packages its command line imports to run a local task
(``requirements-lmms-eval.txt``, what docs/EVALUATION.md installs); the rest (torch, transformers, numpy,
PIL, ...) comes from the venv. Its command line runs in a subprocess with that folder first on
``PYTHONPATH``, offline (no hub).

The tasks are lmms-eval task YAMLs over local JSONL files (real photos cut from scikit-learn's sample
images): an open VQA task scored by lmms-eval's own VQAv2 code (``lmms_eval.tasks.vqav2.utils``), and a
``multiple_choice`` task scored by lmms-eval's log-likelihood machinery (argmin of what the model returns).
The same rows are tools/evaluate.py task files (``open_vqa``, ``multiple_choice`` + ``mc_loglikelihood``).
The references are built from the export's own greedy answers (sample k has k of its 10 references equal
to the answer, upper-cased with a period: the VQA normalisation must undo that), so the scores are not 0.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import sklearn
import torch
from PIL import Image

from megatron_solo.demo.base_tokenizers import pip_target
from tests.conftest import ROOT

PY = sys.executable
PHOTOS = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
# The released lmms-eval and what its command line imports to evaluate a local task (found by running it).
REQUIREMENTS = os.path.join(ROOT, "requirements-lmms-eval.txt")
VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."  # lmms-eval's VQAv2 post_prompt
MC_PROMPT = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."

TASK_UTILS = '''
from PIL import Image
from lmms_eval.tasks.vqav2.utils import vqav2_doc_to_text, vqav2_process_results_val  # lmms-eval's VQAv2


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def mc_doc_to_text(doc):
    options = "\\n".join(f"{k}. {doc[k]}" for k in "ABC")
    return f"{doc['question']}\\n{options}\\nAnswer with the option's letter from the given choices directly."


def mc_doc_to_choice(doc):
    return [doc[k] for k in "ABC"]


def mc_doc_to_target(doc):
    return "ABC".index(doc["answer"])
'''
VQA_YAML = '''task: solo_local_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function solo_task_utils.doc_to_visual
doc_to_text: !function solo_task_utils.vqav2_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
process_results: !function solo_task_utils.vqav2_process_results_val
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
'''
MC_YAML = '''task: solo_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function solo_task_utils.doc_to_visual
doc_to_text: !function solo_task_utils.mc_doc_to_text
doc_to_choice: !function solo_task_utils.mc_doc_to_choice
doc_to_target: !function solo_task_utils.mc_doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''


def _lmms_eval_target() -> str:
    pins = [line.split("#")[0].strip() for line in open(REQUIREMENTS)]
    return pip_target("lmms-eval-0.7.3", [p for p in pins if p], os.path.join("lmms_eval", "__main__.py"))


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _plugin_metadata(out: str) -> str:
    """This package's distribution metadata as ``pip install -e .`` writes it from setup.py (with the
    ``lmms_eval.models`` entry point), in ``out``: first on PYTHONPATH, it is the metadata lmms-eval reads
    even where the venv's editable install was made before setup.py declared the entry point."""
    os.makedirs(out, exist_ok=True)
    r = subprocess.run([PY, "setup.py", "-q", "dist_info", "--output-dir", out], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    (entry_points,) = glob.glob(os.path.join(out, "megatron_solo-*.dist-info", "entry_points.txt"))
    assert "megatron_solo = megatron_solo.eval.lmms_eval_model:manifest" in open(entry_points).read()
    return out


def test_lmms_eval_gives_the_answers_and_scores_of_tools_evaluate(tmp_path, hf_tokenizers):
    from megatron_solo.eval import tasks as T
    from megatron_solo.eval.runner import HFExport, run_task
    from tests.helpers_convert import make_random_solo, make_random_solo_over

    site = _lmms_eval_target()  # the install is not part of the comparison: done first, once per clone
    hf = make_random_solo(str(tmp_path / "hf"), dtype=torch.float32)
    china, flower = (Image.open(os.path.join(PHOTOS, n)).convert("RGB") for n in ("china.jpg", "flower.jpg"))
    images = []
    for i, box in enumerate([(0, 0, 64, 64), (100, 100, 164, 164), (200, 50, 264, 114)]):
        for name, photo in (("c", china), ("f", flower)):
            images.append(str(tmp_path / f"{name}{i}.png"))
            photo.crop(box).save(images[-1])

    # The export's own answers (the runner tools/evaluate.py uses) make references that score > 0.
    backend = HFExport(hf)
    question = "What is in the image?"
    prompts = {i: backend.encode_user_turn([backend.P.load_image(p), VQA_PROMPT.format(question=question)])
               for i, p in enumerate(images)}
    answers = backend.generate_grouped(prompts, 4, 8)
    vqa_rows = []
    for i, path in enumerate(images):
        refs = [answers[i].strip().upper() + "."] * i + ["temple"] * (10 - i)
        vqa_rows.append({"question_id": i, "image": path, "question": question,
                         "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(refs)]})
    # Multiple choice: the right answer is the likeliest option in 2 of 3 rows, the least likely in one.
    opts = {"A": "a flower", "B": "a temple", "C": "a car"}
    mc_rows = []
    for i, path in enumerate(images[:3]):
        prompt = MC_PROMPT.format(question="What is shown?", options="\n".join(f"{k}. {v}" for k, v in opts.items()))
        ll = {k: backend.answer_loglikelihood([path], prompt, v)[0] for k, v in opts.items()}
        answer = (max if i < 2 else min)(ll, key=ll.get)
        mc_rows.append({"index": i, "image": path, "question": "What is shown?", **opts, "answer": answer})
    del backend
    _jsonl(tmp_path / "vqa.jsonl", vqa_rows)
    _jsonl(tmp_path / "mc.jsonl", mc_rows)
    (tmp_path / "vqa.json").write_text(json.dumps({"kind": "open_vqa", "data": "vqa.jsonl", "max_new_tokens": 4}))
    (tmp_path / "mc.json").write_text(json.dumps({"kind": "multiple_choice", "metric": "mc_loglikelihood",
                                                  "data": "mc.jsonl"}))
    lmms_tasks = tmp_path / "lmms_tasks"
    lmms_tasks.mkdir()
    (lmms_tasks / "solo_task_utils.py").write_text(TASK_UTILS)
    (lmms_tasks / "solo_local_vqa.yaml").write_text(VQA_YAML.format(data=tmp_path / "vqa.jsonl"))
    (lmms_tasks / "solo_local_mc.yaml").write_text(MC_YAML.format(data=tmp_path / "mc.jsonl"))

    # lmms-eval's command line (in the background) and tools/evaluate.py on the same rows. The same run also
    # evaluates an export of another family (a tiny Qwen3 base: its tokenizer.json, no BOS, tied embeddings,
    # q/k norms): lmms-eval's --config takes a list of runs, one model each, done in one process.
    qwen = make_random_solo_over(str(tmp_path / "qwen_hf"), "qwen3", hf_tokenizers["solo_qwen"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_plugin_metadata(str(tmp_path / "meta")), site]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               PYTHONWARNINGS="ignore")
    runs = [{"model": "megatron_solo", "model_args": f"pretrained={export}", "tasks": "solo_local_vqa,solo_local_mc",
             "include_path": str(lmms_tasks), "batch_size": 4, "output_path": str(tmp_path / out), "log_samples": True}
            for out, export in (("lmms_out", hf), ("lmms_qwen", qwen))]
    (tmp_path / "lmms_runs.yaml").write_text(json.dumps(runs))  # YAML's flow style
    lmms = subprocess.Popen([PY, "-m", "lmms_eval", "--config", str(tmp_path / "lmms_runs.yaml")],
                            cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run([PY, "tools/evaluate.py", "--hf-dir", hf, "--tasks", f"{tmp_path}/vqa.json,{tmp_path}/mc.json",
                        "--output-dir", str(tmp_path / "tool_out")], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    log, _ = lmms.communicate(timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert lmms.returncode == 0, log[-5000:]
    for out in ("lmms_out", "lmms_qwen"):  # lmms-eval logs an error during evaluation and exits 0
        assert glob.glob(str(tmp_path / out / "*" / "*_results.json")), log[-5000:]
    results = glob.glob(str(tmp_path / "lmms_out" / "*" / "*_results.json"))

    tool = {}
    for line in (tmp_path / "tool_out" / "samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        tool.setdefault(rec["task"], {})[int(rec["id"])] = rec
    summary = json.loads((tmp_path / "tool_out" / "summary.json").read_text())
    results = json.load(open(results[0]))["results"]
    lmms_samples = {}
    for task in ("solo_local_vqa", "solo_local_mc"):
        (path,) = glob.glob(str(tmp_path / "lmms_out" / "*" / f"*_samples_{task}.jsonl"))
        lmms_samples[task] = {s["doc_id"]: s for s in map(json.loads, open(path).read().splitlines())}

    # VQA: the same answers (the tool's are the in-process ones), the same per-sample and mean scores.
    assert [tool["vqa"][i]["output"] for i in range(6)] == [answers[i] for i in range(6)]
    assert [lmms_samples["solo_local_vqa"][i]["filtered_resps"] for i in range(6)] == \
        [answers[i].strip() for i in range(6)]
    # k matching references of 10 score 0, 0.3, 0.6, 0.9, 1, 1 (the official 10-choose-9 average)
    expected = [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert [tool["vqa"][i]["score"] for i in range(6)] == pytest.approx(expected)
    assert [lmms_samples["solo_local_vqa"][i]["exact_match"] for i in range(6)] == pytest.approx(expected)
    assert summary["vqa"]["metrics"]["vqa_accuracy"] == pytest.approx(sum(expected) / 6)
    assert results["solo_local_vqa"]["exact_match,none"] == pytest.approx(sum(expected) / 6)

    # Multiple choice by log-likelihood: lmms-eval gets each option's (negated) log-likelihood of the tool.
    for i in range(3):
        nll = [float(resp[0]) for resp in lmms_samples["solo_local_mc"][i]["filtered_resps"]]  # logged as text
        assert [-x for x in nll] == pytest.approx([tool["mc"][i]["output"][k] for k in "ABC"], rel=1e-6)
        assert lmms_samples["solo_local_mc"][i]["acc"] == tool["mc"][i]["score"] == float(i < 2)
    assert summary["mc"]["metrics"]["accuracy"] == pytest.approx(2 / 3)
    assert results["solo_local_mc"]["acc,none"] == pytest.approx(2 / 3)

    # The Qwen3 export: lmms-eval's answers, scores and option log-likelihoods are tools/evaluate.py's runner's.
    backend = HFExport(qwen)
    want = {}
    for name in ("vqa", "mc"):
        recs, _ = run_task(backend, T.load_task(str(tmp_path / f"{name}.json")), batch_size=4)
        want[name] = {int(rec["id"]): rec for rec in recs}
    got = {}
    for task in ("solo_local_vqa", "solo_local_mc"):
        (path,) = glob.glob(str(tmp_path / "lmms_qwen" / "*" / f"*_samples_{task}.jsonl"))
        got[task] = {s["doc_id"]: s for s in map(json.loads, open(path).read().splitlines())}
    assert [got["solo_local_vqa"][i]["filtered_resps"] for i in range(6)] == \
        [want["vqa"][i]["output"].strip() for i in range(6)]
    assert [want["vqa"][i]["output"] for i in range(6)] != [answers[i] for i in range(6)]  # another model
    assert any(want["vqa"][i]["output"].strip() for i in range(6))
    assert [got["solo_local_vqa"][i]["exact_match"] for i in range(6)] == \
        pytest.approx([want["vqa"][i]["score"] for i in range(6)])
    for i in range(3):
        nll = [float(resp[0]) for resp in got["solo_local_mc"][i]["filtered_resps"]]
        assert [-x for x in nll] == pytest.approx([want["mc"][i]["output"][k] for k in "ABC"], rel=1e-6)
        assert got["solo_local_mc"][i]["acc"] == want["mc"][i]["score"]
