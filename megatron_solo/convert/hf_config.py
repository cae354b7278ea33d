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
from megatron_solo.convert.families import FAMILIES, Family, family_of_hf_config
from megatron_solo.spec import (
    BASE_VOCAB_SIZE,
    IMAGE_ATTENTION_CHOICES,
    IMAGE_POSITIONS_CHOICES,
    MISTRAL_VOCAB,
    PATCH_SIZE,
    SOLO_VOCAB_SIZE,
    SoloVocab,
    mrope_section,
)


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
    """'solo' (an export of this stack, any family) or the base's family name (``convert/families.py``)."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") == "solo" or "SoloForCausalLM" in archs:
        return "solo"
    family = family_of_hf_config(cfg)
    if family is None:
        raise ConversionError(f"unsupported checkpoint: model_type={cfg.get('model_type')!r}, architectures={archs}; "
                              f"expected a base of one of the families {sorted(FAMILIES)} "
                              f"({', '.join(f.hf_class for f in FAMILIES.values())}) or a SOLO export "
                              "(SoloForCausalLM)")
    return family.name


def family_of(cfg: dict) -> Family:
    """The family of a base's or a SOLO export's config (an export names its base's in ``solo_family``;
    exports made before there were families are Mistral's)."""
    kind = hf_kind(cfg)
    return FAMILIES[cfg.get("solo_family", "mistral")] if kind == "solo" else FAMILIES[kind]


def _rope(cfg: dict, family: Family) -> dict:
    """RoPE fields of SoloModelArgs from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (the hub's config.json files)."""
    rp = dict(cfg.get("rope_scaling") or {})
    rp.update(cfg.get("rope_parameters") or {})
    rope_type = rp.get("rope_type", rp.get("type")) or "default"
    if rope_type not in family.rope_types:
        raise ConversionError(f"rope_type {rope_type!r} is not supported for a {family.name} base "
                              f"(supported: {', '.join(family.rope_types)})")
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    out = dict(rotary_base=int(theta) if theta == int(theta) else theta, rope_scaling=None)
    if rope_type == "llama3":
        # megatron-core's llama3 scaling takes the factor; the other three are fixed at Llama-3.1's values.
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, want in fixed.items():
            if float(rp.get(key, want)) != want:
                raise ConversionError(f"rope {key}={rp[key]}: megatron-core's llama3 RoPE scaling has {key}={want:g}")
        out.update(rope_scaling="llama3", rope_scaling_factor=float(rp.get("factor", 8.0)))
    return out


def model_args_from_hf_config(cfg: dict, vocab_size: int | None = None) -> dict:
    """SoloModelArgs fields (as a dict) for a base's or a SOLO export's HF config, by its family's row.

    ``vocab_size``: SOLO's vocabulary over the base (default: a SOLO export's own, Mistral's 33031 for
    a Mistral base, else the config's; a conversion sets it from the tokenizer).
    """
    family = family_of(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {cfg['hidden_act']!r}: SOLO's MLP is SwiGLU (silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConversionError(f"attention_bias/mlp_bias: a {family.name} base with biases on every linear layer is "
                              "not supported")
    switch = family.sliding_window_switch
    if switch is not None and cfg.get(switch):
        raise ConversionError(f"{switch}=true: a {family.name} base with a sliding window on some layers is not "
                              "supported")
    if vocab_size is None:
        vocab_size = int(cfg["vocab_size"]) if cfg.get("model_type") == "solo" or family.name != "mistral" \
            else SOLO_VOCAB_SIZE
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
            vocab_size=int(vocab_size),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            norm_epsilon=float(cfg.get("rms_norm_eps", 1e-5)),
            sliding_window=cfg.get("sliding_window") if switch is None else None,
            init_method_std=float(cfg.get("initializer_range", 0.02)),
            family=family.name,
            qkv_bias=family.qkv_bias,
            qk_layernorm=family.qk_layernorm,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # a SOLO export's own; a base's is set by the conversion from SOLO's vocabulary over its tokenizer
            vision_patch_id=int(cfg.get("vision_patch_token_id", MISTRAL_VOCAB.vision_patch)),
            vision_experts=str(cfg.get("vision_experts", "none")),  # a SOLO export's; a base has none
            **_rope(cfg, family),
        )
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    args.update(_image_choices(cfg, args["kv_channels"]))
    if args["num_attention_heads"] % args["num_query_groups"]:
        raise ConversionError(f"num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={args['num_query_groups']}")
    return args


def _image_choices(cfg: dict, kv_channels: int) -> dict:
    """A SOLO export's image choices (absent: SOLO's), checked against what this stack can build."""
    attention = cfg.get("image_attention", IMAGE_ATTENTION_CHOICES[0])
    positions = cfg.get("image_positions", IMAGE_POSITIONS_CHOICES[0])
    if attention not in IMAGE_ATTENTION_CHOICES or positions not in IMAGE_POSITIONS_CHOICES:
        raise ConversionError(f"image_attention={attention!r}, image_positions={positions!r}: expected one of "
                              f"{IMAGE_ATTENTION_CHOICES} and one of {IMAGE_POSITIONS_CHOICES}")
    if positions == "mrope" and cfg.get("mrope_section") != mrope_section(kv_channels):
        raise ConversionError(f"mrope_section {cfg.get('mrope_section')}: this stack's multimodal RoPE splits a "
                              f"head of {kv_channels} as {mrope_section(kv_channels)}")
    return dict(image_attention=attention, image_positions=positions)


def _image_choices_fields(a: dict, vocab: SoloVocab) -> dict:
    """config.json's image-choice fields: none for SOLO's choices (such an export is as before)."""
    attention = a.get("image_attention", IMAGE_ATTENTION_CHOICES[0])
    positions = a.get("image_positions", IMAGE_POSITIONS_CHOICES[0])
    if (attention, positions) == (IMAGE_ATTENTION_CHOICES[0], IMAGE_POSITIONS_CHOICES[0]):
        return {}
    out = {"image_attention": attention, "image_positions": positions,
           "vision_frame_sep_token_id": vocab.vision_frame_sep}
    if positions == "mrope":
        out["mrope_section"] = mrope_section(int(a["kv_channels"]))
    return out


def _rope_parameters(a: dict) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(a["rotary_base"])}
    if a.get("rope_scaling") == "llama3":
        rope.update(rope_type="llama3", factor=float(a.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)
    return rope


def hf_config_from_model_args(model_args: dict, *, torch_dtype: str = "bfloat16", vocab: SoloVocab = MISTRAL_VOCAB,
                              row_separator: bool = True) -> dict:
    """config.json of an exported SOLO checkpoint: the base family's fields + SOLO's (``vocab``: its ids).

    A Mistral-based export is SOLO-7B's layout exactly; another family's names its base in
    ``solo_family`` and its classes (``Solo<Family>*``, ``hf_files/``) in ``auto_map``. ``row_separator``:
    the image layout of the model's data; SOLO's (True) is the config's default and is not written, so a
    SOLO-layout export stays as it was; False writes ``vision_row_separator: false``."""
    a = model_args
    family = FAMILIES[a.get("family", "mistral")]
    prefix = family.hf_class[: -len("ForCausalLM")]
    if family.name == "mistral":
        classes = ("configuration_solo.SoloConfig", "modeling_solo.SoloMistralModel", "modeling_solo.SoloForCausalLM")
    else:
        classes = tuple(f"{m}.Solo{prefix}{c}" for m, c in (("configuration_solo", "Config"),
                                                              ("modeling_solo", "Model"),
                                                              ("modeling_solo", "ForCausalLM")))
    cfg = {
        "architectures": ["SoloForCausalLM" if family.name == "mistral" else f"Solo{prefix}ForCausalLM"],
        "auto_map": {"AutoConfig": classes[0], "AutoModel": classes[1], "AutoModelForCausalLM": classes[2]},
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
        "bos_token_id": vocab.bos,
        "eos_token_id": vocab.eos,
        "pad_token_id": None,
        "tie_word_embeddings": bool(a.get("tie_word_embeddings", False)),
        "rope_parameters": _rope_parameters(a),
        "sliding_window": a.get("sliding_window"),
        "attention_dropout": 0.0,
        "vision_patch_size": PATCH_SIZE,
        "vision_start_token_id": vocab.vision_start,
        "vision_patch_token_id": vocab.vision_patch,
        "vision_row_sep_token_id": vocab.vision_row_sep,
        "vision_end_token_id": vocab.vision_end,
        **_image_choices_fields(a, vocab),
        "dtype": torch_dtype,
    }
    if not row_separator:
        cfg["vision_row_separator"] = False
    if a.get("vision_experts", "none") != "none":  # absent from a dense export: SOLO-7B's config exactly
        cfg["vision_experts"] = a["vision_experts"]
    if family.name != "mistral":
        cfg["solo_family"] = family.name
        cfg["solo_vocab"] = vocab.to_dict()
        cfg["attention_bias"] = False  # Qwen2's Q/K/V biases are its class's own; no other linear has one
        if family.sliding_window_switch is not None:
            cfg[family.sliding_window_switch] = False
    return cfg


def conversion_shapes(model_args: dict, padded_vocab_size: int, vocab_size: int | None = None,
                      hf_vocab_rows: int | None = None) -> ConversionShapes:
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
        hf_vocab_rows=hf_vocab_rows,
        qkv_bias=bool(a.get("qkv_bias", False)),
        qk_layernorm=bool(a.get("qk_layernorm", False)),
        tie_word_embeddings=bool(a.get("tie_word_embeddings", False)),
        vision_experts=str(a.get("vision_experts", "none")),
    )


def check_hf_checkpoint(hf_dir: str) -> tuple[str, dict, dict, HFCheckpoint]:
    """Validate a base's or a SOLO export's HF dir before anything is built; returns (kind, hf config,
    model args, reader). ``kind``: 'solo' or the base's family. A base's model args carry its own
    ``vocab_size`` (the conversion replaces it by SOLO's vocabulary over the base tokenizer)."""
    cfg = read_hf_config(hf_dir)
    kind = hf_kind(cfg)
    hf_vocab = int(cfg.get("vocab_size", 0))
    args = model_args_from_hf_config(cfg, vocab_size=hf_vocab)
    if kind == "solo" and args["family"] == "mistral" and hf_vocab != SOLO_VOCAB_SIZE:
        raise ConversionError(f"{hf_dir}: a SOLO checkpoint has vocab_size {SOLO_VOCAB_SIZE}, config.json says "
                              f"{hf_vocab}")
    if kind == "mistral" and hf_vocab != BASE_VOCAB_SIZE:
        raise ConversionError(f"{hf_dir}: SOLO extends Mistral's {BASE_VOCAB_SIZE}-piece vocabulary, config.json "
                              f"says vocab_size {hf_vocab}")
    ckpt = HFCheckpoint(hf_dir)
    shapes = conversion_shapes(args, padded_vocab_size=hf_vocab, vocab_size=hf_vocab)
    ckpt.check(expected_hf_shapes(shapes, include_solo_only=(kind == "solo")), f"{kind} checkpoint")
    return kind, cfg, args, ckpt
