"""Run by tests/test_hf_compat.py in a subprocess, once per transformers release (PYTHONPATH picks it):
load an export as a user would (trust_remote_code, its own processing_solo.py), ask about an image,
generate greedily with the KV cache, and write the answer and the prompt's logits as JSON.

    python tests/hf_compat_probe.py HF_DIR IMAGE OUT_JSON
"""

import importlib.util
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def main(hf_dir: str, image: str, out_json: str) -> None:
    spec = importlib.util.spec_from_file_location("processing_solo_probe", os.path.join(hf_dir, "processing_solo.py"))
    P = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(P)
    processor = P.SoloProcessor.from_pretrained(hf_dir)
    inputs = processor.chat([{"role": "user", "content": [P.load_image(image), "Which digit is this?"]}])
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype" if major >= 5 else "torch_dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, **dtype_kw).eval()
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    n = inputs["input_ids"].shape[1]
    with open(out_json, "w") as f:
        json.dump({"transformers": transformers.__version__, "transformers_file": transformers.__file__,
                   "prompt_tokens": n, "answer_ids": cached[0, n:].tolist(),
                   "answer_ids_no_cache": uncached[0, n:].tolist(),
                   "answer": processor.decode(cached[0, n:].tolist()),
                   "last_logits": logits[-1].tolist(), "mean_abs_logits": float(logits.abs().mean())}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
