"""Base-model families (convert/families.py) on tiny random bases built with each family's own transformers
class: a converted base's text logits equal the family's class (fp32, rel <= 1e-5), with the architecture
read from config.json (Llama-3.x tied + llama3 RoPE scaling, Qwen2 QKV bias + rows past the tokenizer,
Qwen3 q/k norm + head_dim != hidden/heads + tied). One spawned process (a world of one) converts all
three; the parent runs transformers."""

import types

import pytest
import torch

from megatron_solo.testing.distributed import run_distributed

FAMILIES = ("llama", "qwen2", "qwen3")


def _vocab(family):
    from tests.helpers_convert import BASE_TOKENS

    # SOLO's pieces after the base's tokens; Qwen reuses its own <|im_start|>/<|im_end|> (1029 added).
    return types.SimpleNamespace(base_size=BASE_TOKENS, size=BASE_TOKENS + (1031 if family == "llama" else 1029))


def _text_ids():
    from tests.helpers_convert import BASE_TOKENS

    g = torch.Generator().manual_seed(11)
    return torch.randint(0, BASE_TOKENS, (2, 14), generator=g)


def _world(paths):
    from megatron_solo.convert.megatron_io import (
        build_full_model,
        hf_to_megatron,
        load_weights,
        megatron_logits,
        read_checkpoint,
    )
    from megatron_solo.model import SoloModelArgs

    out = {}
    for fam in FAMILIES:
        out[f"{fam}_summary"] = hf_to_megatron(paths[fam], paths[f"{fam}_ckpt"], vocab=_vocab(fam), verify=True,
                                               verify_logits=True)
        info = read_checkpoint(paths[f"{fam}_ckpt"])
        model_args = SoloModelArgs(**info["model_args"])
        model = build_full_model(model_args, int(info["padded_vocab_size"]))
        load_weights(model, info)
        out[f"{fam}_args"] = model_args.to_dict()
        out[f"{fam}_logits"] = megatron_logits(model, _text_ids())
        out[f"{fam}_names"] = sorted(n for n, _ in model.named_parameters())
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.helpers_convert import make_random_base

    root = tmp_path_factory.mktemp("families")
    paths = {}
    for i, fam in enumerate(FAMILIES):
        paths[fam] = make_random_base(str(root / fam), fam, seed=20 + i)
        paths[f"{fam}_ckpt"] = str(root / f"{fam}_ckpt")
    return paths, run_distributed(_world, 1, paths, timeout=600)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_base_text_logits_equal_the_family_class(world, family):
    import transformers

    from megatron_solo.convert.families import FAMILIES as TABLE
    from tests.helpers_convert import BASE_TOKENS

    paths, out = world
    ref_model = getattr(transformers, TABLE[family].hf_class).from_pretrained(paths[family], dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(input_ids=_text_ids()).logits[..., :BASE_TOKENS]
    got = out[f"{family}_logits"][..., :BASE_TOKENS]
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, f"{family}: max rel logit diff {rel:.3g}"
    # --verify ran with the family's class too (tensors bit for bit, logits).
    assert out[f"{family}_summary"]["verify"]["tensors_checked"] > 0


def test_architecture_comes_from_config_json(world):
    _, out = world
    llama, qwen2, qwen3 = (out[f"{f}_args"] for f in FAMILIES)
    assert (llama["family"], llama["rope_scaling"], llama["rope_scaling_factor"], llama["rotary_base"]) == \
        ("llama", "llama3", 32.0, 500000)
    assert llama["tie_word_embeddings"] and not llama["qkv_bias"] and not llama["qk_layernorm"]
    assert qwen2["qkv_bias"] and not qwen2["tie_word_embeddings"] and qwen2["rope_scaling"] is None
    assert qwen3["qk_layernorm"] and qwen3["tie_word_embeddings"] and qwen3["kv_channels"] == 16
    assert [a["vocab_size"] for a in (llama, qwen2, qwen3)] == [300 + 1031, 300 + 1029, 300 + 1029]
    # megatron-core's own modules: a bias on linear_qkv, q/k layernorms, no output layer when tied.
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in out["qwen2_names"]
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in out["qwen3_names"]
    assert "output_layer.weight" not in out["llama_names"] and "output_layer.weight" in out["qwen2_names"]
