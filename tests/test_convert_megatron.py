"""Conversion against megatron-core: the Mistral reference (TP=1, TP=2), HF -> Megatron (TP=2, PP=2) -> HF
bit-identical, export parity (logits and greedy generation, image + text), --verify, and the CLI.

One world of 4 gloo ranks runs every Megatron-side step (re-initialising megatron's groups between
layouts), so the process start-up is paid once; the parent compares against transformers.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_solo.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN_STEPS = 5


def _build(model_args, padded, tp, pp):
    from megatron_solo.model import build_solo_model, build_transformer_config
    from megatron_solo.parallel import initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    config = build_transformer_config(model_args, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      use_te=False)
    return build_solo_model(model_args, config, padded_vocab_size=padded, use_te=False)


def _load(ckpt, tp, pp, iteration=None):
    from megatron_solo.convert.megatron_io import load_weights, read_checkpoint
    from megatron_solo.model import SoloModelArgs

    info = read_checkpoint(ckpt, iteration)
    model_args = SoloModelArgs(**info["model_args"])
    model = _build(model_args, info["padded_vocab_size"], tp, pp)
    load_weights(model, info)
    return model, model_args, info


def _world(paths):
    from megatron_solo.convert import VerificationError
    from megatron_solo.convert.megatron_io import (
        hf_to_megatron,
        init_conversion_parallel,
        megatron_logits,
        megatron_to_hf,
        verification_inputs,
        verify_against_hf,
    )
    from megatron_solo.checkpoint import save_checkpoint

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ["RANK"])
    out = {}
    init_conversion_parallel()
    # 1. Mistral -> SOLO init (checked by --verify's reload-and-compare), HF SOLO -> Megatron.
    out["mistral_summary"] = hf_to_megatron(paths["mistral"], paths["ckpt_m"], tokenizer_model="mistral-common",
                                            target_tensor_parallel_size=2, verify=True)
    hf_to_megatron(paths["solo"], paths["ckpt_s"], target_tensor_parallel_size=2)

    # 2. Mistral reference: the converted model at TP=1 and TP=2 on text.
    text_ids, _ = verification_inputs(32000, with_image=False, seed=3)
    out["text_ids"] = text_ids
    for tp in (1, 2):
        model, _, _ = _load(paths["ckpt_m"], tp, 1)
        out[f"mistral_tp{tp}_logits"] = megatron_logits(model, text_ids)[..., :32000]

    # 3. Round trip through TP=2, PP=2: load the HF SOLO's checkpoint there, save it again (iteration 7).
    model, model_args, info = _load(paths["ckpt_s"], 2, 2)
    save_checkpoint(paths["ckpt_rt"], 7, [model], model_args=model_args, padded_vocab_size=info["padded_vocab_size"],
                    tokenizer_model=info["tokenizer_model"])

    # 4. "Training": perturb every weight (padding rows included) at TP=1, save as iteration 8 (latest).
    model, model_args, info = _load(paths["ckpt_rt"], 1, 1, iteration=7)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
            p.copy_(p.to(torch.bfloat16).float())  # keep the values exactly representable in the bf16 export
    save_checkpoint(paths["ckpt_rt"], 8, [model], model_args=model_args, padded_vocab_size=info["padded_vocab_size"],
                    tokenizer_model=info["tokenizer_model"])
    ids, patches = verification_inputs(33031, with_image=True, seed=4)
    out["ids"], out["patches"] = ids, patches
    out["trained_logits"] = megatron_logits(model, ids, patches)[..., :33031]
    gen = ids[:1]
    for _ in range(GEN_STEPS):
        nxt = megatron_logits(model, gen, patches[:6])[:, -1, :33031].argmax(-1, keepdim=True)
        gen = torch.cat([gen, nxt], dim=1)
    out["megatron_generation"] = gen

    # 5. Export: iteration 7 (round trip), the latest (trained, with --verify).
    init_conversion_parallel()
    megatron_to_hf(paths["ckpt_rt"], paths["hf_rt"], iteration=7, dtype="bfloat16", max_shard_size=2**20)
    out["export_summary"] = megatron_to_hf(paths["ckpt_rt"], paths["hf_trained"], dtype="bfloat16", verify=True)
    # a SOLO export of a model trained without row separators: the layout survives import and export
    hf_to_megatron(paths["solo_off"], paths["ckpt_off"])
    megatron_to_hf(paths["ckpt_off"], paths["hf_off"])

    # 6. --verify fails loudly on a mismatch: one weight of the Megatron model off by a little.
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.weight[3, 5] += 1e-2
    try:
        verify_against_hf(model, paths["hf_trained"], kind="solo", padded_vocab_size=info["padded_vocab_size"])
        out["verify_error"] = None
    except VerificationError as e:
        out["verify_error"] = str(e)
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.helpers_convert import make_random_mistral, make_random_solo

    root = tmp_path_factory.mktemp("convert")
    paths = {k: str(root / k) for k in ("mistral", "solo", "ckpt_m", "ckpt_s", "ckpt_rt", "hf_rt", "hf_trained",
                                        "solo_off", "ckpt_off", "hf_off")}
    make_random_mistral(paths["mistral"], seed=1)
    make_random_solo(paths["solo"], seed=2, dtype=torch.bfloat16)
    shutil.copytree(paths["solo"], paths["solo_off"])
    with open(os.path.join(paths["solo_off"], "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(paths["solo_off"], "config.json"), "w") as f:
        json.dump({**cfg, "vision_row_separator": False}, f)
    out = run_distributed(_world, 4, paths, timeout=600)[0]
    return paths, out


@pytest.mark.usefixtures("plain_torch")
def test_mistral_reference_logits_at_tp1_and_tp2(world):
    from transformers import MistralForCausalLM

    paths, out = world
    ref_model = MistralForCausalLM.from_pretrained(paths["mistral"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=out["text_ids"]).logits
    for tp in (1, 2):
        torch.testing.assert_close(out[f"mistral_tp{tp}_logits"], ref, rtol=1e-4, atol=1e-4)
    assert "verify" in out["mistral_summary"] and out["mistral_summary"]["padded_vocab_size"] == 33280


def test_hf_to_megatron_tp2_pp2_to_hf_is_bit_identical(world):
    from safetensors.torch import load_file

    paths, _ = world

    def tensors(d):
        t = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                t.update(load_file(os.path.join(d, f)))
        return t

    src, back = tensors(paths["solo"]), tensors(paths["hf_rt"])
    assert src.keys() == back.keys()
    for k in src:
        assert back[k].dtype == torch.bfloat16 and torch.equal(src[k], back[k]), k


@pytest.mark.usefixtures("plain_torch")
def test_export_parity_logits_and_greedy_generation(world):
    import json

    from transformers import AutoModelForCausalLM

    paths, out = world
    d = paths["hf_trained"]
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["architectures"] == ["SoloForCausalLM"] and cfg["vision_patch_size"] == 32
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_solo.SoloForCausalLM" and cfg["vocab_size"] == 33031
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "processing_solo.py"):
        assert os.path.isfile(os.path.join(d, f)), f
    hf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=out["ids"], vision_patches=out["patches"]).logits
    torch.testing.assert_close(logits, out["trained_logits"], rtol=1e-4, atol=1e-4)
    prompt = out["ids"][:1]
    gen = hf.generate(input_ids=prompt, vision_patches=out["patches"][:6], max_new_tokens=GEN_STEPS, do_sample=False)
    assert torch.equal(gen, out["megatron_generation"])
    assert out["export_summary"]["verify"]["tensors_checked"] == 22
    # Hugging Face-native loading of SOLO-7B's layout too: AutoProcessor gives SoloProcessor, whose
    # processor(text=..., images=...) gives the processor's own pre-training encoding.
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(d, trust_remote_code=True)
    assert type(proc).__name__ == "SoloProcessor" and proc.kind == "sentencepiece"
    img = Image.new("RGB", (96, 64), (200, 30, 30))
    assert torch.equal(proc(text="A <image> photo", images=img)["input_ids"], proc(["A ", img, " photo"])["input_ids"])
    # the tokenizer carries the ChatML template too: its apply_chat_template gives the processor's ids,
    # which are the training data's (tests/test_chat_data.py), text after a marker without a "▁"
    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "\nHello there!"},
            {"role": "assistant", "content": "Hi. Ask."}, {"role": "user", "content": "x"}]
    want = proc.apply_chat_template(msgs)
    assert want[:3] == [1, 33029, 6574] and want.count(33030) == 4  # <s> <|im_start|> "system" (not "▁system")
    tok = AutoTokenizer.from_pretrained(d)
    assert list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)) == want
    assert tok("A photo of a cat.")["input_ids"] == proc("A photo of a cat.")["input_ids"][0].tolist()


def test_export_lays_images_out_as_the_checkpoint_data(world):
    """--row-separator off travels SOLO export -> checkpoint -> export (config.json, the processor); SOLO's
    layout writes nothing new (a default export's config.json is as before)."""
    from megatron_solo.checkpoint import checkpoint_row_separator, read_checkpoint_info
    from megatron_solo.convert.hf_files.processing_solo import SoloProcessor

    paths, _ = world
    assert checkpoint_row_separator(read_checkpoint_info(paths["ckpt_off"])) is False
    assert checkpoint_row_separator(read_checkpoint_info(paths["ckpt_s"])) is True
    for name in ("config.json", "processor_config.json"):
        with open(os.path.join(paths["hf_off"], name)) as f:
            assert json.load(f)["vision_row_separator"] is False
        with open(os.path.join(paths["hf_rt"], name)) as f:
            assert "vision_row_separator" not in json.load(f)
    assert SoloProcessor.from_pretrained(paths["hf_off"]).row_separator is False
    assert SoloProcessor.from_pretrained(paths["hf_rt"]).row_separator is True


def test_verify_fails_on_mismatch(world):
    _, out = world
    assert out["verify_error"] is not None
    assert "decoder.layers.1.mlp.linear_fc2.weight -> model.layers.1.mlp.down_proj.weight differs" in out["verify_error"]


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_export_with_verify_and_clear_errors(world, tmp_path):
    paths, _ = world
    r = _cli("megatron-to-hf", "--load", paths["ckpt_rt"], "--save", str(tmp_path / "hf"), "--verify")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "verify: 22 tensors bit-identical" in r.stdout
    r = _cli("megatron-to-hf", "--load", paths["ckpt_rt"], "--save", str(tmp_path / "hf"))
    assert r.returncode == 1 and "exists and is not empty" in r.stderr
    r = _cli("megatron-to-hf", "--load", str(tmp_path / "nothing"), "--save", str(tmp_path / "hf2"))
    assert r.returncode == 1 and "no such checkpoint directory" in r.stderr and "Traceback" not in r.stderr
    r = _cli("megatron-to-hf", "--load", paths["ckpt_rt"], "--save", str(tmp_path / "hf3"),
             "--tokenizer-model", os.path.join(paths["mistral"], "tokenizer.model"))
    assert r.returncode == 1 and "not SOLO's tokenizer" in r.stderr
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(paths["mistral"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-64])
    r = _cli("hf-to-megatron", "--hf-dir", str(bad), "--save", str(tmp_path / "m"))
    assert r.returncode == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr
