"""Run inside the vLLM environment (requirements-vllm.txt; tests/test_serve_vllm.py starts it once for every
export): serve each export of a job file through vLLM's offline ``LLM`` API, greedy, and write what came back.

    python tests/vllm_probe.py JOB.json OUT.json

It imports vLLM first, then waits for JOB to appear (the test starts it before it writes the exports).

JOB: ``{"max_tokens": N, "models": [{"name", "path", "prompts": [{"prompt_token_ids", "images": [png]}],
"lora": {"path", "prompts": [...]}?}]}``. OUT: per name, ``{"outputs": [{"prompt_token_ids", "token_ids"}],
"lora_outputs": [...], "load_s"}`` or ``{"error": "<the exception's message>"}`` when vLLM refused to load it.
"""

import gc
import json
import os
import sys
import time

from PIL import Image

KV_CACHE_BYTES = 64 << 20  # tens of thousands of tokens of these tiny models (vLLM's CPU default: 4 GiB each)
MAX_SEQS = 8  # a job's prompts at once; vLLM's default (256) sizes its start-up sampler run over the vocabulary


def _prompts(spec):
    out = []
    for p in spec:
        prompt = {"prompt_token_ids": p["prompt_token_ids"]}
        if p.get("images"):
            prompt["multi_modal_data"] = {"image": [Image.open(f).convert("RGB") for f in p["images"]]}
        out.append(prompt)
    return out


def _results(outputs):
    return [{"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids)} for o in outputs]


def main(job_path: str, out_path: str) -> None:
    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    import_s = time.perf_counter() - start
    while not os.path.exists(job_path):  # vLLM imported while the test still writes the exports
        if time.perf_counter() - start > 600:
            raise TimeoutError(f"no job file {job_path} after 600 s")
        time.sleep(0.2)
    with open(job_path) as f:
        job = json.load(f)
    greedy = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
    results = {}
    for m in job["models"]:
        t0 = time.perf_counter()
        lora = m.get("lora")
        try:
            llm = LLM(model=m["path"], trust_remote_code=True, dtype="float32", max_model_len=2048, seed=0,
                      enforce_eager=True, kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_seqs=MAX_SEQS,
                      enable_lora=lora is not None, max_lora_rank=lora["rank"] if lora else 16)
        except Exception as e:  # a refused export: its message is what the test checks
            results[m["name"]] = {"error": f"{type(e).__name__}: {e}"}
            continue
        res = {"load_s": time.perf_counter() - t0, "outputs": _results(llm.generate(_prompts(m["prompts"]), greedy))}
        res["served_s"] = time.perf_counter() - t0
        if lora:
            from vllm.lora.request import LoRARequest

            req = LoRARequest("adapter", 1, lora["path"])
            res["lora_outputs"] = _results(llm.generate(_prompts(lora["prompts"]), greedy, lora_request=req))
            if lora.get("refused"):  # an adapter vLLM must not serve: its message
                try:
                    llm.generate(_prompts(lora["prompts"][:1]), greedy, lora_request=LoRARequest("refused", 2,
                                                                                               lora["refused"]))
                    res["lora_refused"] = None
                except Exception as e:
                    res["lora_refused"] = f"{type(e).__name__}: {e}"
        results[m["name"]] = res
        del llm
        gc.collect()
    results["_times"] = {"import_s": import_s, "total_s": time.perf_counter() - start}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: one start-up
    main(*sys.argv[1:3])
