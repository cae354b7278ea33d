"""Hugging Face ``config.json`` <-> SOLO model arguments, and the check of a HF checkpoint directory.

No megatron import here: a bad input is refused (with a message naming the file and tensor) before
megatron-core is imported or a model is built.
"""

from __future__ import annotations

import json
import os

from megatron_solo.convert.errors import ConversionError
from megatron_solo.convert.mapping import ConversionShapes, expected_hf_shapes
from megatron_solo.convert.safetensors_io import HFCheckpoint
from megatron_solo.spec import BASE_VOCAB_SIZE, BOS_ID, EOS_ID, PATCH_SIZE, SOLO_IDS, SOLO_VOCAB_SIZE


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: not a directory")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def hf_kind(cfg: dict) -> str:
    """'solo' or 'mistral' (a Llama-style checkpoint with Mistral's shapes also counts as mistral)."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") == "solo" or "SoloForCausalLM" in archs:
        return "solo"
    if cfg.get("model_type") in ("mistral", "llama") or any(a in ("MistralForCausalLM", "LlamaForCausalLM")
                                                           for a in archs):
        return "mistral"
    raise ConversionError(f"unsupported checkpoint: model_type={cfg.get('model_type')!r}, architectures={archs}; "
                          "expected a Mistral (MistralForCausalLM) or SOLO (SoloForCausalLM) checkpoint")


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise ConversionError(f"rope_type {rp.get('rope_type')!r} is not supported (SOLO uses plain RoPE)")
    if cfg.get("rope_scaling"):
        raise ConversionError(f"rope_scaling {cfg['rope_scaling']!r} is not supported (SOLO uses plain RoPE)")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def model_args_from_hf_config(cfg: dict) -> dict:
    """SoloModelArgs fields (as a dict) for a Mistral/SOLO HF config. The vocabulary is SOLO's."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {cfg['hidden_act']!r}: SOLO's MLP is SwiGLU (silu)")
    if cfg.get("tie_word_embeddings", False):
        raise ConversionError("tie_word_embeddings=true: SOLO's input embedding and output layer are separate")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConversionError("biases are not supported: SOLO (Mistral) has no biases")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        args = dict(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(cfg.get("num_key_value_heads") or heads),
            kv_channels=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=SOLO_VOCAB_SIZE,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            rotary_base=_rope_theta(cfg),
            norm_epsilon=float(cfg.get("rms_norm_eps", 1e-5)),
            sliding_window=cfg.get("sliding_window"),
            init_method_std=float(cfg.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    if args["rotary_base"] == int(args["rotary_base"]):
        args["rotary_base"] = int(args["rotary_base"])
    if args["num_attention_heads"] % args["num_query_groups"]:
        raise ConversionError(f"num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={args['num_query_groups']}")
    return args


def hf_config_from_model_args(model_args: dict, *, torch_dtype: str = "bfloat16") -> dict:
    """config.json of an exported SOLO checkpoint (Mistral's fields + SOLO's)."""
    a = model_args
    return {
        "architectures": ["SoloForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_solo.SoloConfig",
            "AutoModel": "modeling_solo.SoloMistralModel",
            "AutoModelForCausalLM": "modeling_solo.SoloForCausalLM",
        },
        "model_type": "solo",
        "vocab_size": int(a["vocab_size"]),
        "hidden_size": int(a["hidden_size"]),
        "intermediate_size": int(a["ffn_hidden_size"]),
        "num_hidden_layers": int(a["num_layers"]),
        "num_attention_heads": int(a["num_attention_heads"]),
        "num_key_value_heads": int(a["num_query_groups"]),
        "head_dim": int(a["kv_channels"]),
        "hidden_act": "silu",
        "max_position_embeddings": int(a["max_position_embeddings"]),
        "initializer_range": float(a.get("init_method_std", 0.02)),
        "rms_norm_eps": float(a["norm_epsilon"]),
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(a["rotary_base"])},
        "sliding_window": a.get("sliding_window"),
        "attention_dropout": 0.0,
        "vision_patch_size": PATCH_SIZE,
        "vision_start_token_id": SOLO_IDS.vision_start,
        "vision_patch_token_id": SOLO_IDS.vision_patch,
        "vision_row_sep_token_id": SOLO_IDS.vision_row_sep,
        "vision_end_token_id": SOLO_IDS.vision_end,
        "dtype": torch_dtype,
    }


def conversion_shapes(model_args: dict, padded_vocab_size: int, vocab_size: int | None = None) -> ConversionShapes:
    a = model_args
    return ConversionShapes(
        num_layers=int(a["num_layers"]),
        hidden_size=int(a["hidden_size"]),
        ffn_hidden_size=int(a["ffn_hidden_size"]),
        num_attention_heads=int(a["num_attention_heads"]),
        num_query_groups=int(a["num_query_groups"]),
        head_dim=int(a["kv_channels"]),
        vocab_size=int(vocab_size if vocab_size is not None else a["vocab_size"]),
        padded_vocab_size=int(padded_vocab_size),
    )


def check_hf_checkpoint(hf_dir: str) -> tuple[str, dict, dict, HFCheckpoint]:
    """Validate a Mistral/SOLO HF dir before anything is built; returns (kind, hf config, model args, reader)."""
    cfg = read_hf_config(hf_dir)
    kind = hf_kind(cfg)
    args = model_args_from_hf_config(cfg)
    hf_vocab = int(cfg.get("vocab_size", 0))
    if kind == "solo" and hf_vocab != SOLO_VOCAB_SIZE:
        raise ConversionError(f"{hf_dir}: a SOLO checkpoint has vocab_size {SOLO_VOCAB_SIZE}, config.json says "
                              f"{hf_vocab}")
    if kind == "mistral" and hf_vocab != BASE_VOCAB_SIZE:
        raise ConversionError(f"{hf_dir}: SOLO extends Mistral's {BASE_VOCAB_SIZE}-piece vocabulary, config.json "
                              f"says vocab_size {hf_vocab}")
    ckpt = HFCheckpoint(hf_dir)
    shapes = conversion_shapes(args, padded_vocab_size=hf_vocab, vocab_size=hf_vocab)
    ckpt.check(expected_hf_shapes(shapes, include_solo_only=(kind == "solo")), f"{kind} checkpoint")
    return kind, cfg, args, ckpt
