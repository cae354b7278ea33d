#!/usr/bin/env python3
"""vLLM (the registry's CPU build, through this package's plugin) vs transformers' ``generate`` on the same SOLO
export: generated tokens per second, greedy, for a batch of image+text prompts, as measured (issue 27).

Both sides get the same prompts (SOLO's processor: one photo each, a question) and must give the same tokens.
transformers runs here (``.venv``), one ``generate`` per prompt (tools/evaluate.py's runner batches only
equal-length prompts: this is its case for prompts that differ) and, as a second baseline, one batched
``generate`` of the equal-length prompts; vLLM runs in its own environment
(requirements-vllm.txt, ``.cache/vllm-env``: tests/test_serve_vllm.py installs it) in one subprocess, all
prompts in one ``LLM.generate`` (its scheduler batches them). The two sides are different processes and
Pythons (3.12 / 3.11); their timed runs alternate (transformers one at a time, batched, vLLM, again), so a
change of the shared machine's load hits all three alike.

    .venv/bin/python benchmarks/vllm_generate.py --prompts 16 --max-new-tokens 32 --repeats 3

Default export: a random one of the demo's shape (Mistral base, hidden 128, 4 layers, head size 32); or
``--hf-dir`` (a head size vLLM's CPU attention has: 32, 64, 80, 96, 112, 128, ...).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VLLM_PY = os.path.join(ROOT, ".cache", "vllm-env", "bin", "python")
DEMO_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)


def vllm_side(job_path: str, out_path: str) -> None:
    """In the vLLM environment: load once, warm up, then one timed run of every prompt at once per line read
    from stdin (the parent alternates them with its own runs); the times and tokens go to ``out_path``."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from PIL import Image
    from vllm import LLM, SamplingParams

    job = json.load(open(job_path))
    t0 = time.perf_counter()
    llm = LLM(model=job["hf_dir"], trust_remote_code=True, dtype="float32", max_model_len=4096, seed=0,
              enforce_eager=True, kv_cache_memory_bytes=256 << 20)
    load_s = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": p["ids"], "multi_modal_data": {"image": [Image.open(p["image"]).convert("RGB")]}}
               for p in job["prompts"]]
    params = SamplingParams(max_tokens=job["max_new_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    print("ready", flush=True)
    times, tokens = [], None
    for _ in sys.stdin:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        print("done", flush=True)
    json.dump({"load_s": load_s, "times": times, "tokens": tokens}, open(out_path, "w"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", default=None, help="an export (default: a random one of the demo's shape)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm-side", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.vllm_side:
        vllm_side(*a.vllm_side)
        return 0
    if not os.path.exists(VLLM_PY):
        print(f"error: no vLLM environment at {VLLM_PY}: run tests/test_serve_vllm.py once (it installs it)")
        return 2

    import sklearn
    import torch
    from PIL import Image

    from megatron_solo import quiet
    from megatron_solo.convert.hf_export_files import load_export_processor
    from megatron_solo.serve.prompts import vllm_prompt

    quiet.filter_known_warnings()
    torch.set_num_threads(os.cpu_count() or 1)
    work = tempfile.mkdtemp(prefix="vllm_bench_")
    hf_dir = a.hf_dir
    if hf_dir is None:
        from tests.helpers_convert import make_random_solo

        hf_dir = make_random_solo(os.path.join(work, "hf"), dtype=torch.float32, **DEMO_SHAPE)
    processor = load_export_processor(hf_dir).SoloProcessor.from_pretrained(hf_dir)
    photo = Image.open(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "china.jpg"))
    prompts = []  # equal-sized crops (4x6 patches) at different places, one question: equal-length prompts
    for k in range(a.prompts):
        path = os.path.join(work, f"{k}.png")
        photo.convert("RGB").crop((10 * k, 5 * k, 10 * k + 192, 5 * k + 128)).save(path)
        image = Image.open(path).convert("RGB")
        parts = [image, "What is in this image?"]
        prompts.append((path, processor(parts), vllm_prompt(processor, parts)["prompt_token_ids"]))

    job = {"hf_dir": hf_dir, "max_new_tokens": a.max_new_tokens, "repeats": a.repeats,
           "prompts": [{"ids": ids, "image": path} for path, _, ids in prompts]}
    with open(os.path.join(work, "job.json"), "w") as f:
        json.dump(job, f)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONWARNINGS="ignore")
    for var in ("PYTHONPATH", "VLLM_CPU_KVCACHE_SPACE"):  # our venv's packages; it overrides the KV cache size
        env.pop(var, None)
    side = subprocess.Popen([VLLM_PY, os.path.abspath(__file__), "--vllm-side", os.path.join(work, "job.json"),
                             os.path.join(work, "vllm.json")], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(os.path.join(work, "vllm.log"), "w"), text=True)

    def wait_for(word: str) -> bool:  # vLLM and torch print their own lines on stdout too
        for line in side.stdout:
            if line.strip() == word:
                return True
        print(open(os.path.join(work, "vllm.log")).read()[-5000:])
        return False

    def vllm_round() -> None:
        side.stdin.write("go\n")
        side.stdin.flush()
        if not wait_for("done"):
            raise RuntimeError("the vLLM side stopped")

    if not wait_for("ready"):
        return 1

    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    # ignore EOS as vLLM does (ignore_eos): every prompt generates max_new_tokens
    greedy = GenerationConfig(max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    batch = {k: torch.cat([p[1][k] for p in prompts]) for k in ("input_ids", "attention_mask", "vision_patches")}
    n = batch["input_ids"].shape[1]
    times = {"one_at_a_time": [], "batched": []}
    tokens = {}
    with torch.no_grad():
        model.generate(**prompts[0][1], generation_config=greedy)  # warm-up
        for _ in range(a.repeats):  # the three in turn (ABC ABC ...): the machine's load changes over minutes
            t0 = time.perf_counter()
            tokens["one_at_a_time"] = [model.generate(**p[1], generation_config=greedy)[0, n:].tolist()
                                       for p in prompts]
            times["one_at_a_time"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(**batch, generation_config=greedy)
            times["batched"].append(time.perf_counter() - t0)
            tokens["batched"] = out[:, n:].tolist()
            vllm_round()
    side.stdin.close()
    side.wait()
    got = json.load(open(os.path.join(work, "vllm.json")))
    generated = a.prompts * a.max_new_tokens
    tps = {k: generated / statistics.median(v) for k, v in times.items()}
    tps["vllm"] = generated / statistics.median(got["times"])
    result = {
        "export": hf_dir, "prompts": a.prompts, "prompt_tokens": n, "max_new_tokens": a.max_new_tokens,
        "repeats": a.repeats, "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "vllm_vs_transformers_one_at_a_time": round(tps["vllm"] / tps["one_at_a_time"], 2),
        "vllm_vs_transformers_batched": round(tps["vllm"] / tps["batched"], 2),
        "vllm_load_s": round(got["load_s"], 1),
        "same_tokens": {k: tokens[k] == got["tokens"] for k in tokens},
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result, indent=2))
    return 0 if all(result["same_tokens"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
