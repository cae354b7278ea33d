"""An answer option as a training sample: the one definition of an option's log-likelihood, shared by
the training loop (in_loop.py, on megatron-core) and tools/evaluate.py (runner.py, on an export).

The option is the assistant's answer in a chat document (user turn: the image, then the prompt) encoded
by preprocessing's own encoder; its log-likelihood is minus the summed loss over the tokens training
counts there (``loss_mask``: the answer and its end of turn), so both places score the same tokens.
"""

from __future__ import annotations

from megatron_solo.data.dataset import build_sample
from megatron_solo.data.encode import DocumentEncoder, EncodedDocument, normalize_messages
from megatron_solo.data.tokenizer import load_tokenizer
from megatron_solo.eval.tasks import Sample


class OptionEncoder:
    def __init__(self, tokenizer_path: str):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.encoder = DocumentEncoder(self.tokenizer, fmt="chat")

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
        """The training sample (tokens, labels, loss_mask, patches ...) of ``doc``, padded to ``seq_length``."""
        return build_sample([(doc.tokens, doc.roles, doc.patches)], seq_length, "assistant", self.tokenizer.vocab)
