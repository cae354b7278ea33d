"""Hugging Face <-> megatron_solo conversion (see docs/CONVERSION.md).

* :mod:`megatron_solo.convert.mapping`: the one declarative name/transform table (plain torch).
* :mod:`megatron_solo.convert.hf_config`: HF ``config.json`` <-> model args; checking a HF checkpoint.
* :mod:`megatron_solo.convert.safetensors_io`: safetensors shards read and written one tensor at a time.
* :mod:`megatron_solo.convert.hf_export_files`: an export's config, tokenizer and remote-code files.
* :mod:`megatron_solo.convert.megatron_io`: ``hf_to_megatron``, ``megatron_to_hf``, ``--verify``.
* :mod:`megatron_solo.convert.full_model`: the model a conversion runs (TP=1, PP=1), in memory or on ``meta``.
* :mod:`megatron_solo.convert.dcp_stream`: megatron-core's checkpoint format written one chunk at a time and
  read one parameter at a time (the conversion never holds a model).
* ``hf_files/``: ``configuration_solo.py``, ``modeling_solo.py``, ``processing_solo.py``, copied into
  every export (``trust_remote_code``).

Importing this package is cheap and changes nothing global; the megatron-facing functions below
import megatron-core on first use (on a CPU machine the caller first runs ``cpu_backend.ensure()``).
"""

from megatron_solo.convert.errors import ConversionError, VerificationError  # noqa: F401
from megatron_solo.convert.mapping import MAPPINGS, bound_mappings  # noqa: F401

_MEGATRON_API = ("hf_to_megatron", "megatron_to_hf", "verify_against_hf", "megatron_logits", "build_full_model")


def __getattr__(name):
    if name in _MEGATRON_API:
        # on first use: megatron_io loads megatron-core, and importing this package stays cheap
        from megatron_solo.convert import megatron_io

        return getattr(megatron_io, name)
    raise AttributeError(f"module 'megatron_solo.convert' has no attribute {name!r}")


__all__ = ["ConversionError", "VerificationError", "MAPPINGS", "bound_mappings", *_MEGATRON_API]
