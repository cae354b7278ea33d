"""Role codes per token and SOLO's loss-mask rule (``../shared/SOLO_SPEC.md``, "Documents, roles and loss").

Roles are stored on disk as uint8, one per token. Every token of an image block (``<vision>``,
``<vpatch>``, ``<vrow_sep>``, ``<vframe_sep>``, ``</vision>``) has role IMAGE. A document's BOS takes the
role of the document's first message. The codes are in :mod:`megatron_solo.spec`.
"""

from __future__ import annotations

import numpy as np

from megatron_solo.spec import ROLE_CODES, SOLO_IDS, TEXT_ROLES


def trained_roles(loss_role: str) -> tuple[int, ...]:
    """``--loss-role``: 'assistant' (SOLO's default), 'user', 'system', or 'all' (every text role)."""
    if loss_role == "all":
        return TEXT_ROLES
    if loss_role not in ROLE_CODES:
        raise ValueError(f"unknown loss role {loss_role!r}; choose one of {sorted(ROLE_CODES)} or 'all'")
    return (ROLE_CODES[loss_role],)


def label_loss_mask(labels: np.ndarray, label_roles: np.ndarray, label_valid: np.ndarray,
                    loss_role: str = "assistant") -> np.ndarray:
    """Loss mask over *label* positions (the token being predicted).

    A label counts when it is valid (inside the same document as its input token, not padding),
    its role is a trained role (never IMAGE), and its id is a plain text piece (< ``SOLO_IDS.first_special``,
    32000; EOS is one, so solo-inst's answer-closing ``</s>`` is trained), with SOLO_SPEC's one exception:
    ``<|im_end|>`` in a trained-role turn (the stop token that closes an assistant turn in ChatML)
    carries loss, so a tuned model learns to stop. Every other id >= 32000 (vision markers,
    ``<|im_start|>``, location tokens) never does. Arrays are any matching shape; returns float32.
    """
    roles = np.isin(label_roles, trained_roles(loss_role))
    ids = (labels < SOLO_IDS.first_special) | (labels == SOLO_IDS.im_end)
    return (label_valid & roles & ids).astype(np.float32)
