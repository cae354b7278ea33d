"""An answer option as a training sample: the one definition of an option's log-likelihood, shared by
the training loop (in_loop.py, on megatron-core) and tools/evaluate.py (runner.py, on an export).

The option is the assistant's answer in a chat document (user turn: the image, then the prompt) encoded
by preprocessing's own encoder; its log-likelihood is minus the summed loss over the tokens training
counts there (``loss_mask``: the answer and its end of turn), so both places score the same tokens.
"""

from __future__ import annotations

import numpy as np

from megatron_solo.data.dataset import build_sample
from megatron_solo.data.encode import DocumentEncoder, EncodedDocument, normalize_messages
from megatron_solo.data.patch_coords import grid_coords
from megatron_solo.data.tokenizer import load_tokenizer
from megatron_solo.eval.tasks import Sample
from megatron_solo.spec import ASSISTANT


class OptionEncoder:
    """``row_separator``: the image layout of the model's data (the run's, or the export's)."""

    def __init__(self, tokenizer_path: str, row_separator: bool = True):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.encoder = DocumentEncoder(self.tokenizer, fmt="chat", row_separator=row_separator)

    def encode(self, sample: Sample, text: str) -> EncodedDocument:
        return self.encode_answer([sample.image], sample.prompt, text)

    def encode_answer(self, images: list[str], prompt: str, text: str) -> EncodedDocument:
        """``text`` as the answer to a user turn of ``images`` (paths or ``data:`` URLs), then ``prompt``."""
        record = {"messages": [
            {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": url}} for url in images),
                                         {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": text}]}
        return self.encoder.encode(normalize_messages(record))

    def sample(self, doc: EncodedDocument, seq_length: int) -> dict:
        """The training sample (tokens, labels, loss_mask, patches, patch_coords ...) of ``doc``, padded to
        ``seq_length``."""
        return build_sample([(doc.tokens, doc.roles, doc.patches, patch_coords(doc))], seq_length, "assistant",
                            self.tokenizer.vocab)

    # ---- generation (the training loop's greedy decoding, in_loop.py) ----
    def generation_prompt(self, sample: Sample) -> EncodedDocument:
        """The chat prompt with the assistant's turn opened, as the export's processor lays it out: the
        document of an empty answer up to that answer's end of turn (the last ``<|im_end|>``)."""
        doc = self.encode(sample, "")
        n = int(np.flatnonzero(doc.tokens == self.tokenizer.vocab.im_end)[-1])
        return EncodedDocument(doc.tokens[:n], doc.roles[:n], doc.patches, grids=doc.grids)

    def continued(self, prompt: EncodedDocument, answer: list[int], seq_length: int) -> dict:
        """The training sample of ``prompt`` followed by the answer so far (its next token is predicted
        at the last input position, ``len(prompt.tokens) + len(answer) - 1``)."""
        tokens = np.concatenate([prompt.tokens, np.asarray(answer, prompt.tokens.dtype)])
        roles = np.concatenate([prompt.roles, np.full(len(answer), ASSISTANT, prompt.roles.dtype)])
        return build_sample([(tokens, roles, prompt.patches, patch_coords(prompt))], seq_length, "assistant",
                            self.tokenizer.vocab)

    def decode_answer(self, ids: list[int]) -> str:
        """An answer's text as the export's processor decodes it: control ids and padding rows dropped."""
        v = self.tokenizer.vocab
        return self.tokenizer.decode([i for i in ids if i < v.base_size and i not in v.control_ids])


def patch_coords(doc: EncodedDocument) -> np.ndarray:
    """Each patch's (row, col) in its image, from the document's image grids (either layout)."""
    coords = [grid_coords(0, rows * cols, cols) for rows, cols in doc.grids]
    return np.concatenate(coords) if coords else np.zeros((0, 2), np.int64)
