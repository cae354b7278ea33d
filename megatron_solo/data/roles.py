"""Role codes per token and SOLO's loss-mask rule (``../shared/SOLO_SPEC.md``, "Documents, roles and loss").

Roles are stored on disk as uint8, one per token. Every token of an image block (``<vision>``,
``<vpatch>``, ``<vrow_sep>``, ``<vframe_sep>``, ``</vision>``) has role IMAGE. A document's BOS takes the
role of the document's first message. SOLO marked the BOS between packed documents with role 1000; here
document boundaries are stored explicitly (see docs/DATA_FORMAT.md), so no such code is needed.
"""

from __future__ import annotations

import numpy as np

SYSTEM, USER, ASSISTANT, IMAGE = 0, 1, 2, 3
ROLE_CODES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
TEXT_ROLES = (SYSTEM, USER, ASSISTANT)
FIRST_SPECIAL_ID = 32000  # no loss on ids >= this: vision markers, location and chat markers


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
    its role is a trained role (never IMAGE), and its id is a plain text piece (< 32000).
    Arrays are any matching shape; returns float32 of that shape.
    """
    roles = np.isin(label_roles, trained_roles(loss_role))
    return (label_valid & roles & (labels < FIRST_SPECIAL_ID)).astype(np.float32)
