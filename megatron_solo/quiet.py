"""Quiet, honest logs: the third-party warnings that tell a user nothing, filtered by the entry points.

megatron-core warns at import, once per module, that Transformer Engine and apex are missing and it
falls back to its local layers (about ten lines per process on a CPU or a GPU without TE), logs that
``GPTModel`` (which ``SoloModel`` extends) is deprecated and that its own async save strategy is, torch
logs that no CUDA runtime is found on a CPU machine, and libraries emit FutureWarnings about their own
future defaults. None of it asks the user to do anything; the
trainer says once which layers it uses instead (:func:`local_layers_note`).

Only these messages are filtered, by their text (``warnings.filterwarnings``, a filter on the one
logger that emits each record); any other warning still
shows. Nothing happens at import: :func:`filter_known_warnings` is called by entry points (the trainer's
and tools' ``main``), before they import megatron-core.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, category) of warnings that say nothing actionable to a user of this package.
KNOWN_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    (r"Transformer Engine is not installed", UserWarning),
    (r"full scope is deprecated", UserWarning),                 # megatron-core's own default cuda-graph scope
    (r"MimoModelConfig is experimental", UserWarning),
    (r"Could not determine rank from torch.distributed", UserWarning),  # a single-process check or tool
    (r"torch.distributed is disabled, unavailable or uninitialized", UserWarning),  # one-process conversion
    # megatron-core's DDP reads .grad of its own non-leaf views (on the CPU path, through cpu_backend).
    (r"The .grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning),
    (r"The following imports from `dynamic_context.py` will be removed", DeprecationWarning),
    # torch's checkpoint API notes that megatron-core calls its load with positional arguments.
    (r"The argument order of load has been changed", UserWarning),
    (r".*", FutureWarning),                                     # libraries' notes about their future defaults
)

# Log records (logger name, text in the message) said once per process by megatron-core and torch.
KNOWN_LOG_RECORDS = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    ("megatron.core.dist_checkpointing.strategies.torch", "async save is deprecated"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
    ("megatron.core.distributed.distributed_data_parallel", "full_param_layout not provided"),
    # The blend's index is rebuilt in seconds at each start; --data-cache-path keeps it where a user wants one.
    ("megatron.core.datasets.blended_dataset", "Cannot save the BlendedDataset indexes because path_to_cache is None"),
    # a weighted single prefix (DATA_PATH="1.0 data/sft", as docs/TRAINING.md writes it) is a blend of one: valid
    ("megatron.core.datasets.blended_dataset", "Building a BlendedDataset for a single MegatronDataset"),
    ("megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision", "without Transformer Engine"),
    ("megatron.core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer", "using Megatron-FSDP with Megatron"),
    ("megatron.core.distributed.fsdp.src.megatron_fsdp.megatron_fsdp", "using Megatron-FSDP with Megatron"),
    # torchrun's agent on Ctrl-C/SIGTERM: megatron_solo/training/torchrun.py says the outcome in one line instead
    ("torch.distributed.elastic.agent.server.api", "death signal, shutting down workers"),
    ("torch.distributed.elastic.multiprocessing.api", "closing signal SIG"),
    # torchrun's 4-line banner at every multi-process launch: it sets its default (1 thread per worker), and
    # OMP_NUM_THREADS set by the user is kept
    ("torch.distributed.run", "Setting OMP_NUM_THREADS environment variable for each process"),
)


class _DropKnown(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_installed = False


def filter_known_warnings() -> None:
    """Install the filters (once per process). Call from an entry point before megatron-core is imported."""
    global _installed
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not _installed:
        for name, text in KNOWN_LOG_RECORDS:
            logging.getLogger(name).addFilter(_DropKnown(text))
        _installed = True


def local_layers_note(use_te: bool) -> str:
    """The one line the trainer prints instead of the import-time warnings."""
    if use_te:
        return "layers: Transformer Engine"
    return ("layers: megatron-core's local (torch) layers, since Transformer Engine/apex are absent or off "
            "(their import warnings are filtered: megatron_solo/quiet.py)")
