"""The model a conversion runs: the whole SOLO model at TP=1, PP=1 with the local spec (full tensors, the
mapping table's layout), in memory (:func:`build_full_model`) or on the meta device
(:func:`build_meta_model`: its layout and sharded state dict, no memory), over the current world."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_solo.meta_device import meta_device
from megatron_solo.model import build_solo_model, build_transformer_config
from megatron_solo.parallel import initialize_model_parallel


def init_conversion_parallel() -> None:
    """TP=1, PP=1 over the current world (a world of one when run from the command line)."""
    if (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1):
        return
    initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)


def build_full_model(model_args, padded_vocab_size: int, params_dtype=torch.float32, initialize: bool = False,
                     lora=None):
    """The whole SOLO model in this process (TP=1, PP=1, local spec), parameters left uninitialised
    unless ``initialize`` (conversion overwrites every one of them); ``lora``: with the LoRA adapters of a
    checkpoint that holds them (``model/lora.py``)."""
    init_conversion_parallel()
    config = build_transformer_config(model_args, params_dtype=params_dtype, use_te=False,
                                      perform_initialization=initialize)
    return build_solo_model(model_args, config, pre_process=True, post_process=True,
                            padded_vocab_size=padded_vocab_size, use_te=False, lora=lora)


def build_meta_model(model_args, padded_vocab_size: int, params_dtype: torch.dtype, lora=None):
    """The full TP=1/PP=1 SOLO model (local spec) on the meta device: its layout, no memory."""
    init_conversion_parallel()
    config = build_transformer_config(model_args, params_dtype=params_dtype, use_te=False,
                                      perform_initialization=False)
    with meta_device():
        return build_solo_model(model_args, config, pre_process=True, post_process=True,
                                padded_vocab_size=padded_vocab_size, use_te=False, lora=lora)
