"""Every input of a run checked in one process, before anything is built.

A wrong tokenizer, a missing or damaged data prefix or an unwritable ``--save`` found after megatron-core's
initialisation would be a traceback on every rank, minutes in; here each is one
:class:`~megatron_solo.errors.InputError` line at start-up (the launchers' pre-flight calls
:func:`check_inputs` too, before torchrun). The format checks live with their formats: a data prefix in
:func:`megatron_solo.data.indexed.check_prefix`. A checkpoint of another model shape is refused earlier, where
the architecture is decided (:func:`megatron_solo.training.config.decide_architecture`).
"""

from __future__ import annotations

import os
import uuid

from megatron_solo import checkpoint
from megatron_solo.data.dataset import parse_data_path
from megatron_solo.data.indexed import check_prefix
from megatron_solo.data import tokenizer as solo_tokenizer
from megatron_solo.errors import InputError
from megatron_solo.spec import MISTRAL_VOCAB, SoloVocab, vocab_mismatch
from megatron_solo.training.faults.lock import SaveDirLock


def check_tokenizer(path: str):
    """The one tokenizer check (:func:`megatron_solo.data.tokenizer.check_tokenizer`); returns the tokenizer."""
    try:
        return solo_tokenizer.check_tokenizer(path)
    except solo_tokenizer.TokenizerError as e:
        raise InputError(f"--tokenizer-model {path}: {e}") from None


def run_vocab(cfg, tokenizer=None) -> SoloVocab | None:
    """SOLO's vocabulary of the run's model: its ``--tokenizer-model``'s (which must be the one of the
    checkpoint it starts from), else its checkpoint's, else Mistral's when the model has Mistral's 33031
    ids; None when nothing says (the data's ids are then only checked against the vocabulary size)."""
    ck = checkpoint.checkpoint_vocab(cfg.resume.info) if cfg.resume.info is not None else None
    if tokenizer is None:
        return ck if ck is not None else (MISTRAL_VOCAB if cfg.model.args.vocab_size == MISTRAL_VOCAB.size else None)
    problem = ck and vocab_mismatch(ck, tokenizer.vocab, f"the checkpoint {cfg.resume.info['path']}",
                                    f"--tokenizer-model {tokenizer.model_path}")
    if problem:
        raise InputError(f"{problem}; pass the tokenizer the checkpoint was made with")
    return tokenizer.vocab


def _prefixes(data_path, flag: str) -> list[str]:
    """The prefixes a data-path flag names (a shard set's shards); a shard set that is not there is one line."""
    try:
        return parse_data_path(list(data_path))[0]
    except FileNotFoundError as e:  # an unfinished shard list, a glob matching no complete prefix
        raise InputError(f"{flag}: {e}") from None


def check_save_dir(save: str) -> None:
    """``--save`` can be created and written (a file created and removed there)."""
    try:
        os.makedirs(save, exist_ok=True)
        probe = os.path.join(save, f".write_test.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--save {save} is not writable ({e.strerror or e}); choose a writable directory") from None


def check_inputs(cfg, *, save_lock: bool = True) -> SoloVocab | None:
    """Every input of a run, checked in one process before megatron-core is initialised; raises
    :class:`InputError` (one line) for the first problem. ``cfg`` is a
    :class:`~megatron_solo.training.config.TrainConfig` (the resume plan has read ``--load``'s info).
    ``save_lock``: also refuse a ``--save`` whose lock is live (a launcher's pre-flight; inside a run,
    rank 0 takes the lock instead, and the other ranks must not see their own run's lock as foreign).
    Returns the run's checked vocabulary (:func:`run_vocab`), which the trainer counts images with and saves."""
    vocab_size = cfg.model.args.vocab_size
    tokenizer = check_tokenizer(cfg.data.tokenizer_model) if cfg.data.tokenizer_model else None
    if tokenizer is not None:
        vocab_size = min(vocab_size, tokenizer.vocab_size)
    vocab = run_vocab(cfg, tokenizer)
    patch_id = cfg.model.args.vision_patch_id
    if vocab is not None and patch_id != vocab.vision_patch:
        raise InputError(f"the model takes <vpatch> as id {patch_id}, its tokenizer and checkpoint as "
                         f"{vocab.vision_patch} (SOLO's vocabulary of {vocab.describe()}); build the model for "
                         "that base (its converted checkpoint, or the --model preset of its family)")
    prefixes = {p: "--data-path" for p in _prefixes(cfg.data.data_path, "--data-path")}
    if cfg.data.valid_data_path:
        prefixes.update({p: "--valid-data-path" for p in _prefixes(cfg.data.valid_data_path, "--valid-data-path")
                         if p not in prefixes})
    for prefix, flag in prefixes.items():
        check_prefix(prefix, vocab_size, vocab, flag)
    if cfg.checkpoint.save:
        check_save_dir(cfg.checkpoint.save)
        if save_lock:
            SaveDirLock(cfg.checkpoint.save).check_free()
    return vocab
