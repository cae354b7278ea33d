"""The export of a checkpoint with LoRA adapters (``model/lora.py``): merged into the weights, or as a
Hugging Face PEFT adapter directory.

Both go through the one mapping table (``convert/mapping.py``): an adapted Megatron weight ``W`` (TP=1
layout) has ``lora_a`` [r, in] and ``lora_b`` [out, r] beside it, and

* **merged** (``megatron-to-hf --merge-lora``): the row's Megatron tensor is ``W + (alpha/r) B A``
  (computed in fp32, then in the checkpoint's dtype), exported by the row's transform as any weight;
* **PEFT** (default for such a checkpoint): ``B``'s rows are the layer's output rows, so the row's
  transform splits ``B`` exactly as it splits ``W`` (``qkv_gqa``: per KV group into q/k/v; ``gated_mlp``:
  gate/up), and every HF tensor of the row gets ``A`` whole: ``B_q A x`` is the q rows of ``B A x``. The
  directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` under PEFT's names
  (``base_model.model.<module>.lora_A.weight``), which ``peft.PeftModel.from_pretrained`` loads onto the
  export of the base (``modeling_solo.py``'s modules: ``q_proj`` ... ``down_proj``, ``embed_vision_patch``).
"""

from __future__ import annotations

import json
import os

import torch

from megatron_solo.convert.errors import ConversionError
from megatron_solo.parameter_names import LORA_PARAMS


def adapter_names(weight_name: str) -> tuple[str, str]:
    """``...linear_qkv.weight`` -> (``...linear_qkv.lora_a``, ``...linear_qkv.lora_b``)."""
    prefix = weight_name[: -len(".weight")]
    return tuple(f"{prefix}.{p}" for p in LORA_PARAMS)


class AdaptedWeights:
    """The table's Megatron tensors of a checkpoint with adapters: ``get`` merges (``W + scale B A``)
    where the weight has adapters; ``adapters`` returns (A, B) or None."""

    def __init__(self, get, names, lora: dict):
        self._get, self._names = get, set(names)
        self.scale = float(lora["alpha"]) / int(lora["rank"])

    def adapters(self, weight_name: str):
        if not weight_name.endswith(".weight"):
            return None
        a, b = adapter_names(weight_name)
        if a not in self._names:
            return None
        return self._get(a), self._get(b)

    def get(self, name: str) -> torch.Tensor:
        w = self._get(name)
        ab = self.adapters(name)
        if ab is None:
            return w
        a, b = ab
        return (w.float() + self.scale * (b.float() @ a.float())).to(w.dtype)


def write_peft_adapter(out_dir: str, adapted: AdaptedWeights, mappings, shapes, lora: dict, dtype,
                       base: dict | None) -> dict:
    """``adapter_config.json`` + ``adapter_model.safetensors`` of every adapted table row; returns a summary.
    ``base``: the checkpoint the adapters adapt (kept in the safetensors metadata and the summary)."""
    from safetensors.torch import save_file

    tensors, modules = {}, set()
    with torch.no_grad():
        for bm in mappings:
            ab = adapted.adapters(bm.megatron)
            if ab is None:
                continue
            a, b = ab
            for hf_name, b_part in bm.to_hf(b, shapes).items():
                module = hf_name[: -len(".weight")]
                modules.add(module.rsplit(".", 1)[-1])
                tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).contiguous().clone()
                tensors[f"base_model.model.{module}.lora_B.weight"] = b_part.to(dtype).contiguous()
    if not tensors:
        raise ConversionError("the checkpoint records LoRA adapters but holds none of the table's weights' adapters")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora["rank"]), "lora_alpha": float(lora["alpha"]),
        "lora_dropout": float(lora.get("dropout", 0.0)), "target_modules": sorted(modules), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "base_model_name_or_path": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    meta = {"format": "pt", "megatron_solo_base": json.dumps(base or {})}
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata=meta)
    return {"peft_adapter": out_dir, "adapted_modules": len(tensors) // 2, "target_modules": sorted(modules),
            "base": base}
