"""SOLO's tokenizer: a SentencePiece model (Mistral-7B-v0.1's) with SOLO's pieces appended.

The pieces are appended to the model proto itself, as SOLO did, so plain ``sentencepiece`` and the
training code see the same ids (``../shared/SOLO_SPEC.md``; the ids and pieces are in
:mod:`megatron_solo.spec`): ``<vision>``=32000 ... ``<loc_1024>``=33028, ``<|im_start|>``=33029, ``<|im_end|>``=33030.
This project writes them as USER_DEFINED pieces; SOLO's release wrote them as NORMAL pieces. Nothing
depends on that: text is always encoded by the 32000-piece base model inside the file
(:meth:`SoloTokenizer.encode`), so a ``<|im_end|>`` or ``<vpatch>`` typed in text stays plain text pieces
whichever way the file marks them, and ids >= 32000 enter a sample only where the encoder places them
(``megatron_solo.data.encode``).
"""

from __future__ import annotations

import os
from functools import cached_property

from megatron_solo.spec import (
    BASE_VOCAB_SIZE,
    BOS_ID,
    EOS_ID,
    MAKE_VOCAB_SIZE_DIVISIBLE_BY,
    SOLO_IDS,
    SOLO_SPECIAL_PIECES,
    SOLO_VOCAB_SIZE,
    pad_vocab_size,
)


def extend_sentencepiece_model(base_model_bytes: bytes, piece_type: str = "USER_DEFINED") -> bytes:
    """Append SOLO's pieces to a serialized SentencePiece model; return the new serialized model.

    ``piece_type``: "USER_DEFINED" (this project's tool) or "NORMAL" (how SOLO's release built its file).
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(base_model_bytes)
    n = len(proto.pieces)
    if n != BASE_VOCAB_SIZE:
        existing = {p.piece for p in proto.pieces}
        if n == SOLO_VOCAB_SIZE and all(p in existing for p in SOLO_SPECIAL_PIECES):
            raise ValueError(f"this tokenizer already holds SOLO's pieces ({SOLO_VOCAB_SIZE} pieces); use it as it is")
        raise ValueError(
            f"base tokenizer has {n} pieces; SOLO's ids assume a {BASE_VOCAB_SIZE}-piece base "
            "(Mistral-7B-v0.1's tokenizer.model)"
        )
    existing = {p.piece for p in proto.pieces}
    clash = [p for p in SOLO_SPECIAL_PIECES if p in existing]
    if clash:
        raise ValueError(f"base tokenizer already defines {clash[:3]}...")
    for piece in SOLO_SPECIAL_PIECES:
        new = proto.pieces.add()
        new.piece = piece
        new.score = 0.0
        new.type = getattr(sp_pb2.ModelProto.SentencePiece, piece_type)
    return proto.SerializeToString()


def create_solo_tokenizer(base_model: str, output_dir: str) -> str:
    """Write ``output_dir/tokenizer.model`` (atomically) and check the ids; return its path."""
    with open(base_model, "rb") as f:
        data = extend_sentencepiece_model(f.read())
    os.makedirs(output_dir, exist_ok=True)
    out = os.path.join(output_dir, "tokenizer.model")
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    SoloTokenizer(tmp).check_solo_ids()
    os.replace(tmp, out)
    return out


def text_only_processor(model_path: str, dummy_prefix: bool = True):
    """A SentencePiece processor of the file's first 32000 pieces (the base model): SOLO's pieces are
    dropped, so no text can ever encode to one of them. The ids of text pieces are the file's."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    del proto.pieces[BASE_VOCAB_SIZE:]
    proto.trainer_spec.vocab_size = BASE_VOCAB_SIZE
    proto.normalizer_spec.add_dummy_prefix = dummy_prefix
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


class SoloTokenizer:
    """SentencePiece wrapper with SOLO's ids and Megatron's padded vocabulary size."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.ids = SOLO_IDS
        self._text_sps: dict = {}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
        return pad_vocab_size(self.vocab_size, tensor_model_parallel_size, divisible_by)

    def check_solo_ids(self) -> None:
        """Raise unless this model carries SOLO's pieces at SOLO's ids (as USER_DEFINED pieces, as this
        project writes them, or as NORMAL pieces, as SOLO's release did: both are accepted)."""
        if self.vocab_size != SOLO_VOCAB_SIZE:
            raise ValueError(
                f"{self.model_path}: {self.vocab_size} pieces, a SOLO tokenizer has {SOLO_VOCAB_SIZE}; "
                "build one with tools/create_solo_tokenizer.py"
            )
        for i, piece in enumerate(SOLO_SPECIAL_PIECES):
            got = self.sp.piece_to_id(piece)
            if got != BASE_VOCAB_SIZE + i:
                raise ValueError(f"{self.model_path}: {piece} has id {got}, SOLO expects {BASE_VOCAB_SIZE + i}")
        if (self.sp.bos_id(), self.sp.eos_id()) != (BOS_ID, EOS_ID):
            raise ValueError(f"{self.model_path}: BOS/EOS are {self.sp.bos_id()}/{self.sp.eos_id()}, "
                             f"expected {BOS_ID}/{EOS_ID}")

    def encode(self, text: str, dummy_prefix: bool = True) -> list[int]:
        """Text to ids of text pieces only (< 32000), without BOS/EOS, whatever the text spells.

        ``dummy_prefix=False`` leaves out SentencePiece's leading "▁": text that continues after a
        control id is encoded as SentencePiece encodes it in context after a matched piece."""
        return self._text_sp(dummy_prefix).encode(text)

    def _text_sp(self, dummy_prefix: bool):
        if dummy_prefix not in self._text_sps:
            self._text_sps[dummy_prefix] = text_only_processor(self.model_path, dummy_prefix)
        return self._text_sps[dummy_prefix]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(BASE_VOCAB_SIZE, self.vocab_size))


def mistral_tokenizer_path() -> str:
    """The real Mistral-7B-v0.1 tokenizer shipped in the ``mistral-common`` package (32000 pieces)."""
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mistral-common is not installed (pip install mistral-common)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mistral-common has no {path}")
    return path
