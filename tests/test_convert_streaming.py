"""Streaming conversion (megatron_solo/convert/dcp_stream.py): both directions keep the source's dtype unless
asked (bf16 stays bf16, --params-dtype float32 widens exactly), the model is never materialised (the written
checkpoint comes from a meta-device model), and --verify compares tensor by tensor and catches a single
changed element on either side. One spawned process (world of one) runs every Megatron-side step."""

import os
import shutil

import pytest
import torch

from megatron_solo.testing.distributed import run_distributed
from tests.helpers_convert import safetensors_tensors


def _world(paths):
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_solo.convert import VerificationError
    from megatron_solo.convert.megatron_io import (
        checkpoint_reader,
        hf_to_megatron,
        megatron_to_hf,
        read_checkpoint,
        verify_checkpoint_against_hf,
        verify_tensors,
    )

    def stored_dtypes(ckpt):
        md = FileSystemReader(read_checkpoint(ckpt)["path"]).read_metadata()
        return {str(v.properties.dtype) for v in md.state_dict_metadata.values() if hasattr(v, "properties")}

    out = {}
    # Every chunk handed to torch's writer is freed once written (torch keeps a reference to each until its
    # file closes, and a rank writes one file): count the earlier chunks still holding memory at each hand-over.
    from megatron_solo.convert import dcp_stream

    resolve, handed, live = dcp_stream._LazyPlanner.resolve_data, [], []

    def recording(planner, item):
        t = resolve(planner, item)
        if isinstance(t, torch.Tensor):
            live.append(sum(h.untyped_storage().nbytes() > 0 for h in handed))
            handed.append(t)
        return t

    dcp_stream._LazyPlanner.resolve_data = recording
    out["bf16_summary"] = hf_to_megatron(paths["solo"], paths["ck_bf16"])
    dcp_stream._LazyPlanner.resolve_data = resolve
    out["chunks"] = (len(handed), max(live), sum(h.untyped_storage().nbytes() > 0 for h in handed))
    out["bf16_stored"] = stored_dtypes(paths["ck_bf16"])
    out["fp32_summary"] = hf_to_megatron(paths["solo"], paths["ck_fp32"], params_dtype="float32")
    out["fp32_stored"] = stored_dtypes(paths["ck_fp32"])
    megatron_to_hf(paths["ck_bf16"], paths["hf_bf16"], max_shard_size=2**20)
    megatron_to_hf(paths["ck_fp32"], paths["hf_fp32"])
    megatron_to_hf(paths["ck_fp32"], paths["hf_fp32_as_bf16"], dtype="bfloat16")

    info = read_checkpoint(paths["ck_bf16"])
    out["verify_ok"] = verify_checkpoint_against_hf(info, paths["solo"], kind="solo", logits=False)
    # Planted mismatch on the HF side (one element of one tensor, changed in the file by the parent).
    try:
        verify_checkpoint_against_hf(info, paths["solo_planted"], kind="solo", logits=False)
        out["planted_hf"] = None
    except VerificationError as e:
        out["planted_hf"] = str(e)
    # Planted mismatch on the Megatron side: one element of one re-read parameter.
    reader = checkpoint_reader(info)

    def get(name):
        t = reader.get(name)
        if name == "decoder.layers.0.self_attention.linear_qkv.weight":
            t = t.clone()
            t[7, 3] += 1.0
        return t

    try:
        verify_tensors(get, paths["solo"], kind="solo", model_args=info["model_args"],
                       padded_vocab_size=int(info["padded_vocab_size"]))
        out["planted_megatron"] = None
    except VerificationError as e:
        out["planted_megatron"] = str(e)
    out["meta_model"] = {p.device.type for p in reader.model.parameters()}
    return out


def _plant(src, dst, name):
    """Copy a HF directory and change one element of ``name`` by one bf16 ulp, in the file."""
    from megatron_solo.convert.safetensors_io import HFCheckpoint

    shutil.copytree(src, dst)
    ck = HFCheckpoint(dst)
    with open(os.path.join(dst, ck.file_of[name]), "r+b") as f:
        f.seek(ck.offset[name] + 2 * 10)
        raw = bytearray(f.read(2))
        raw[0] ^= 1
        f.seek(ck.offset[name] + 2 * 10)
        f.write(raw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.helpers_convert import make_random_solo

    root = tmp_path_factory.mktemp("stream")
    paths = {k: str(root / k) for k in ("solo", "solo_planted", "ck_bf16", "ck_fp32", "hf_bf16", "hf_fp32",
                                         "hf_fp32_as_bf16")}
    make_random_solo(paths["solo"], seed=3, dtype=torch.bfloat16)
    _plant(paths["solo"], paths["solo_planted"], "model.layers.1.mlp.up_proj.weight")
    return paths, run_distributed(_world, 1, paths, timeout=600)[0]


def test_bf16_stays_bf16_and_round_trips_bit_identical(world):
    paths, out = world
    assert out["bf16_summary"]["params_dtype"] == "bfloat16" and out["bf16_stored"] == {"torch.bfloat16"}
    src, back = safetensors_tensors(paths["solo"]), safetensors_tensors(paths["hf_bf16"])
    assert src.keys() == back.keys() and len(src) == 22
    for k in src:
        assert back[k].dtype == torch.bfloat16 and torch.equal(src[k], back[k]), k


def test_params_dtype_widens_exactly_and_export_keeps_or_narrows(world):
    paths, out = world
    assert out["fp32_summary"]["params_dtype"] == "float32" and out["fp32_stored"] == {"torch.float32"}
    src, wide = safetensors_tensors(paths["solo"]), safetensors_tensors(paths["hf_fp32"])
    narrow = safetensors_tensors(paths["hf_fp32_as_bf16"])
    for k in src:
        assert wide[k].dtype == torch.float32 and torch.equal(wide[k], src[k].float()), k
        assert narrow[k].dtype == torch.bfloat16 and torch.equal(narrow[k], src[k]), k


def test_conversion_never_builds_the_model(world):
    _, out = world
    assert out["meta_model"] == {"meta"}
    # and holds one chunk at a time: none of the earlier ones at each hand-over, none after the save
    # (16 parameters; linear_fc1's halves are chunks of their own)
    n, live_while_writing, live_after = out["chunks"]
    assert n >= 16 and live_while_writing == 0 and live_after == 0, out["chunks"]


def test_streaming_verify_passes_and_catches_one_changed_element(world):
    _, out = world
    assert out["verify_ok"] == {"tensors_checked": 22}
    assert out["planted_hf"] is not None
    assert "model.layers.1.mlp.up_proj.weight differs" in out["planted_hf"]
    assert out["planted_megatron"] is not None
    assert ("decoder.layers.0.self_attention.linear_qkv.weight -> model.layers.0.self_attn.q_proj.weight differs"
            in out["planted_megatron"])
