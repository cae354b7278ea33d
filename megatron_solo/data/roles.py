"""Role codes per token and SOLO's loss-mask rule (SOLO's release: documents, roles and loss).

Roles are stored on disk as uint8, one per token. Every token of an image block (``<vision>``,
``<vpatch>``, ``<vrow_sep>``, ``<vframe_sep>``, ``</vision>``) has role IMAGE. A document's BOS takes the
role of the document's first message. The codes are in :mod:`megatron_solo.spec`.
"""

from __future__ import annotations

import numpy as np

from megatron_solo.spec import MISTRAL_VOCAB, ROLE_CODES, TEXT_ROLES, SoloVocab


def trained_roles(loss_role: str) -> tuple[int, ...]:
    """``--loss-role``: 'assistant' (SOLO's default), 'user', 'system', or 'all' (every text role)."""
    if loss_role == "all":
        return TEXT_ROLES
    if loss_role not in ROLE_CODES:
        raise ValueError(f"unknown loss role {loss_role!r}; choose one of {sorted(ROLE_CODES)} or 'all'")
    return (ROLE_CODES[loss_role],)


def trainable_ids(labels: np.ndarray, vocab: SoloVocab = MISTRAL_VOCAB) -> np.ndarray:
    """Which label ids may carry loss (docs/DATA_FORMAT.md "Tokenizer and SOLO's vocabulary"): never a control id (SOLO's pieces, padded
    rows, the base's special tokens), except the trained stop tokens: ``<|im_end|>``, which closes a ChatML
    turn, a Llama-3 base's ``<|eot_id|>``, which closes a ``llama3`` turn, and EOS, where the format
    places it (solo-inst's answer end, a Qwen document's ``<|endoftext|>``), so that a tuned model learns
    to stop."""
    control = (labels >= vocab.base_size) | np.isin(labels, vocab.base_special_ids)
    stop = (labels == vocab.im_end) | (labels == vocab.eos)
    return ~control | stop | (labels == vocab.eot) if vocab.eot is not None else ~control | stop


def label_loss_mask(labels: np.ndarray, label_roles: np.ndarray, label_valid: np.ndarray,
                    loss_role: str = "assistant", vocab: SoloVocab = MISTRAL_VOCAB) -> np.ndarray:
    """Loss mask over *label* positions (the token being predicted).

    A label counts when it is valid (inside the same document as its input token, not padding), its
    role is a trained role (never IMAGE), and its id may carry loss (:func:`trainable_ids`: text, or a
    trained stop token). ``vocab``: the ids of the data's tokenizer (Mistral's for data stored without
    one). Arrays are any matching shape; returns float32.
    """
    roles = np.isin(label_roles, trained_roles(loss_role))
    return (label_valid & roles & trainable_ids(labels, vocab)).astype(np.float32)
