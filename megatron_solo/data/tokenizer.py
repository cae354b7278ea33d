"""SOLO's tokenizer: a base tokenizer with SOLO's pieces appended, of one of two kinds behind one interface.

- ``sentencepiece``: a ``tokenizer.model`` (Mistral-7B-v0.1's, as SOLO did). The pieces are appended to
  the model proto itself, so plain ``sentencepiece`` and the training code see the same ids
  (``<vision>``=32000 ... ``<|im_end|>``=33030 over Mistral's 32000 pieces). This project writes them as
  USER_DEFINED pieces; SOLO's release wrote them as NORMAL pieces; nothing depends on that.
- ``hf``: a Hugging Face ``tokenizer.json`` (byte-level BPE: Llama-3, Qwen) read with the ``tokenizers``
  library, with its ``tokenizer_config.json`` beside it (``bos_token``/``eos_token``/``pad_token``). SOLO's
  pieces are special added tokens after the base's full length; Qwen's own ``<|im_start|>``/``<|im_end|>``
  are reused (docs/DATA_FORMAT.md "Tokenizer and SOLO's vocabulary").

Which ids are SOLO's is data (:class:`megatron_solo.spec.SoloVocab`), derived once from the file by
:func:`derive_vocab`. Text never encodes to a control id (SOLO's pieces and the base's special tokens),
whatever it spells: SentencePiece text goes through the base's pieces only, and ``tokenizers`` encodes
with special-token matching off, so a user typing ``<|im_end|>``, ``<vpatch>`` or ``<|endoftext|>`` gets
text. Control ids enter a sample only where the encoder places them (``megatron_solo.data.encode``).
:func:`check_tokenizer` is the one check of a ``--tokenizer-model`` (preprocessing, training, conversion).
"""

from __future__ import annotations

import json
import os
from functools import cached_property

from megatron_solo.spec import (
    BASE_CHAT_PIECES,
    MAKE_VOCAB_SIZE_DIVISIBLE_BY,
    REUSABLE_PIECES,
    SOLO_SPECIAL_PIECES,
    VISION_START,
    SoloVocab,
    pad_vocab_size,
)

SENTENCEPIECE, HF = "sentencepiece", "hf"
SP_FILE, HF_FILE, HF_CONFIG = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot serve SOLO (missing, unreadable, not extended, inconsistent): one line."""


def tokenizer_file(path: str) -> tuple[str, str]:
    """(kind, file) of a tokenizer path: a ``tokenizer.model``, a ``tokenizer.json``, or a directory
    holding one (``tokenizer.model`` first: a Mistral directory holds both, and SOLO-7B uses that one)."""
    if os.path.isdir(path):
        for name, kind in ((SP_FILE, SENTENCEPIECE), (HF_FILE, HF)):
            if os.path.isfile(os.path.join(path, name)):
                return kind, os.path.join(path, name)
        raise FileNotFoundError(f"tokenizer model not found: {path} holds neither {SP_FILE} nor {HF_FILE}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    return (HF if path.endswith(".json") else SENTENCEPIECE), path


def load_tokenizer(path: str):
    """The tokenizer at ``path`` (see :func:`tokenizer_file`), of either kind; SOLO's or a base."""
    kind, file = tokenizer_file(path)
    return HFTokenizer(file) if kind == HF else SoloTokenizer(file)


def check_tokenizer(path: str | None):
    """The one tokenizer check of preprocessing, training and conversion: the file exists, parses, and
    holds SOLO's pieces at the ids derived from its base. Returns the tokenizer; raises
    :class:`TokenizerError` with one line (the caller adds its flag's name)."""
    if not path:
        raise TokenizerError("tokenizer model not found: none given")
    try:
        tok = load_tokenizer(path)
        tok.vocab  # noqa: B018 - derives and checks SOLO's ids
    except (OSError, RuntimeError, ValueError) as e:  # sentencepiece / tokenizers say RuntimeError/OSError/Exception
        raise TokenizerError(_one_line(e)) from None
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type on a malformed file
        raise TokenizerError(f"{path}: not a tokenizer ({_one_line(e)})") from None
    return tok


def _one_line(e: BaseException) -> str:
    """The first line of a library's error (or its type's name when it says nothing)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def derive_vocab(tok) -> SoloVocab:
    """SOLO's ids over ``tok``'s base (docs/DATA_FORMAT.md "Tokenizer and SOLO's vocabulary"): a base tokenizer gives the ids its
    extension will have; an extended one gives the ids it must have (its base ends where ``<vision>`` is)."""
    at = tok.find_piece(VISION_START)
    base_size = at if at is not None else tok.vocab_size
    specials, bos, eos, pad = tok.base_special_tokens(base_size)
    reused = {}
    for piece in SOLO_SPECIAL_PIECES:
        i = tok.find_piece(piece)
        if i is None or i >= base_size:
            continue
        if piece not in REUSABLE_PIECES or i not in specials:
            raise TokenizerError(f"{tok.model_path}: the base tokenizer already has {piece} (id {i}) as "
                                 f"{'a special' if i in specials else 'a text'} token; SOLO's pieces must be new "
                                 f"(only {' and '.join(REUSABLE_PIECES)} may be reused, as special tokens)")
        reused[piece] = i
    base_chat = {f: i for f, piece in BASE_CHAT_PIECES.items()
                 if (i := tok.find_piece(piece)) is not None and i in specials}  # Llama-3's header/turn-end tokens
    return SoloVocab.over_base(base_size, bos=bos, eos=eos, pad=pad, base_special_ids=specials, reused=reused,
                               base_chat=base_chat)


def _checked_vocab(tok) -> SoloVocab:
    """``tok``'s SoloVocab, after checking that it holds SOLO's pieces at the derived ids."""
    vocab = tok.derived_vocab
    if tok.find_piece(VISION_START) is None or tok.vocab_size != vocab.size:
        raise TokenizerError(f"{tok.model_path}: {tok.vocab_size} pieces, a SOLO tokenizer has {vocab.size}; "
                             "build one with tools/create_solo_tokenizer.py")
    for piece, want in vocab.piece_ids().items():
        got = tok.find_piece(piece)
        if got != want:
            raise TokenizerError(f"{tok.model_path}: {piece} has id {got}, SOLO expects {want}")
    return vocab


class _SoloTokenizerBase:
    """What both kinds share: the vocabulary, its check, Megatron's padded size."""

    kind: str
    model_path: str

    @cached_property
    def derived_vocab(self) -> SoloVocab:
        """:func:`derive_vocab` of this file, unchecked: a base's text is encoded with it too."""
        return derive_vocab(self)

    @cached_property
    def vocab(self) -> SoloVocab:
        """SOLO's ids in this file (:class:`~megatron_solo.spec.SoloVocab`); raises :class:`TokenizerError`
        unless it is a SOLO tokenizer."""
        return _checked_vocab(self)

    def check_solo_ids(self) -> None:
        """Raise unless this file carries SOLO's pieces at the ids derived from its base."""
        self.vocab  # noqa: B018

    @property
    def special_ids(self) -> frozenset[int]:
        return self.vocab.control_ids

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1,
                          divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
        return pad_vocab_size(self.vocab_size, tensor_model_parallel_size, divisible_by)


# --- SentencePiece ------------------------------------------------------------------------------------
def _sp_proto(data: bytes):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(data)
    return proto


def _sp_processor(data: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=data)


def extend_sentencepiece_model(base_model_bytes: bytes, piece_type: str = "USER_DEFINED") -> bytes:
    """Append SOLO's pieces to a serialized SentencePiece model; return the new serialized model.

    ``piece_type``: "USER_DEFINED" (this project's tool) or "NORMAL" (how SOLO's release built its file).
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    base = SoloTokenizer.from_processor(_sp_processor(base_model_bytes), "the base tokenizer")
    if base.find_piece(VISION_START) is not None:
        raise ValueError(f"this tokenizer already holds SOLO's pieces ({base.vocab_size} pieces); use it as it is")
    vocab = derive_vocab(base)
    proto = _sp_proto(base_model_bytes)
    for piece, i in vocab.piece_ids().items():
        if i < vocab.base_size:
            continue  # a chat marker the base has (reused)
        new = proto.pieces.add()
        new.piece = piece
        new.score = 0.0
        new.type = getattr(sp_pb2.ModelProto.SentencePiece, piece_type)
    return proto.SerializeToString()


def text_only_processor(model_path: str, dummy_prefix: bool = True, base_size: int | None = None,
                        control_ids=frozenset()):
    """A SentencePiece processor of the file's base pieces only (the first ``base_size``, default: up to
    ``<vision>``): SOLO's pieces are dropped, and base pieces among ``control_ids`` that SentencePiece
    would match in text (USER_DEFINED) become CONTROL, so no text can ever encode to a control id. The
    ids of text pieces are the file's."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    with open(model_path, "rb") as f:
        proto = _sp_proto(f.read())
    if base_size is None:
        base_size = next((i for i, p in enumerate(proto.pieces) if p.piece == VISION_START), len(proto.pieces))
    del proto.pieces[base_size:]
    Piece = sp_pb2.ModelProto.SentencePiece
    for i in control_ids:
        if i < base_size and proto.pieces[i].type == Piece.USER_DEFINED:
            proto.pieces[i].type = Piece.CONTROL
    proto.trainer_spec.vocab_size = base_size
    proto.normalizer_spec.add_dummy_prefix = dummy_prefix
    return _sp_processor(proto.SerializeToString())


class SoloTokenizer(_SoloTokenizerBase):
    """SentencePiece ``tokenizer.model`` with SOLO's ids and Megatron's padded vocabulary size."""

    kind = SENTENCEPIECE

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self._text_sps: dict = {}

    @classmethod
    def from_processor(cls, sp, name: str) -> "SoloTokenizer":
        """A tokenizer over an in-memory processor (a base being extended): ids and pieces, no text."""
        tok = cls.__new__(cls)
        tok.model_path, tok.sp, tok._text_sps = name, sp, {}
        return tok

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def find_piece(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def base_special_tokens(self, base_size: int):
        """(special ids, bos, eos, pad) of the base: its CONTROL pieces (``<s>``, ``</s>``) and
        USER_DEFINED ones (chat markers); padding is ``pad_id``, else ``<unk>`` (Mistral: 0), else EOS."""
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        sp, Piece = self.sp, sp_pb2.ModelProto.SentencePiece
        pieces = _sp_proto(sp.serialized_model_proto()).pieces
        specials = {i for i in range(base_size) if pieces[i].type == Piece.CONTROL
                    or (pieces[i].type == Piece.USER_DEFINED and pieces[i].piece in REUSABLE_PIECES)}
        bos, eos = sp.bos_id(), sp.eos_id()
        if eos < 0:
            raise TokenizerError(f"{self.model_path}: the base tokenizer has no EOS")
        pad = next(i for i in (sp.pad_id(), sp.unk_id(), eos) if i >= 0)
        return specials, (bos if bos >= 0 else None), eos, pad

    def encode(self, text: str, dummy_prefix: bool = True) -> list[int]:
        """Text to ids of text pieces only (never a control id), without BOS/EOS, whatever the text spells.

        ``dummy_prefix=False`` leaves out SentencePiece's leading "▁": text that continues after a
        control id is encoded as SentencePiece encodes it in context after a matched piece."""
        return self._text_sp(dummy_prefix).encode(text)

    def _text_sp(self, dummy_prefix: bool):
        if dummy_prefix not in self._text_sps:
            v = self.derived_vocab
            self._text_sps[dummy_prefix] = text_only_processor(self.model_path, dummy_prefix, v.base_size, v.control_ids)
        return self._text_sps[dummy_prefix]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)


# --- Hugging Face tokenizer.json ------------------------------------------------------------------------
def _token_name(value) -> str | None:
    """A tokenizer_config.json token entry: a string, an AddedToken dict, or null."""
    return value.get("content") if isinstance(value, dict) else value


def read_hf_config(tokenizer_json_path: str) -> dict:
    """The ``tokenizer_config.json`` beside a ``tokenizer.json``."""
    path = os.path.join(os.path.dirname(os.path.abspath(tokenizer_json_path)), HF_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tokenizer_json_path}: no {HF_CONFIG} beside it (its bos_token and eos_token "
                                "say where documents start and end); copy the base model's")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class HFTokenizer(_SoloTokenizerBase):
    """A Hugging Face ``tokenizer.json`` (byte-level BPE) read with ``tokenizers``, and the
    ``bos_token``/``eos_token``/``pad_token`` of the ``tokenizer_config.json`` beside it."""

    kind = HF

    def __init__(self, model_path: str, *, tokenizer_json: str | None = None, config: dict | None = None):
        from tokenizers import Tokenizer

        self.model_path = model_path
        if tokenizer_json is None:
            if not os.path.isfile(model_path):
                raise FileNotFoundError(f"tokenizer model not found: {model_path}")
            with open(model_path, encoding="utf-8") as f:
                tokenizer_json = f.read()
        self.config = read_hf_config(model_path) if config is None else config
        self.tk = Tokenizer.from_str(tokenizer_json)
        # Special added tokens are not matched in text: "<|endoftext|>" typed by a user is text.
        self.tk.encode_special_tokens = True

    @cached_property
    def vocab_size(self) -> int:
        """The full length: every id of the BPE model's vocabulary (0..n-1) and of its added tokens."""
        return max(self.tk.get_vocab_size(with_added_tokens=False) - 1, *self.tk.get_added_tokens_decoder()) + 1

    def find_piece(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def base_special_tokens(self, base_size: int):
        """(special ids, bos, eos, pad) of the base: its special added tokens, and the config's tokens
        (no BOS when the config has none or says ``add_bos_token: false``; padding falls back to EOS)."""
        specials = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special and i < base_size}

        def token_id(key):
            name = _token_name(self.config.get(key))
            if name is None:
                return None
            i = self.find_piece(name)
            if i is None or i >= base_size:
                raise TokenizerError(f"{self.model_path}: {HF_CONFIG}'s {key} {name!r} is not a token of the base")
            return i

        eos = token_id("eos_token")
        if eos is None:
            raise TokenizerError(f"{self.model_path}: {HF_CONFIG} names no eos_token")
        bos = token_id("bos_token") if self.config.get("add_bos_token", True) is not False else None
        pad = token_id("pad_token")
        pad = eos if pad is None else pad
        specials |= {i for i in (bos, eos, pad) if i is not None}
        return specials, bos, eos, pad

    @cached_property
    def _producible_controls(self) -> frozenset[int]:
        """Control ids that are also pieces of the BPE model itself (none in Llama-3 or Qwen): only these
        could come out of text, so only these are looked for in :meth:`encode`'s result."""
        return frozenset(i for i in self.derived_vocab.control_ids if self.tk.model.id_to_token(i) is not None)

    def encode(self, text: str, dummy_prefix: bool = True) -> list[int]:
        """Text to ids (never a control id), without BOS/EOS, whatever the text spells. ``dummy_prefix``
        is SentencePiece's notion; byte-level BPE adds no prefix, so text encodes the same either way."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if self._producible_controls and not self._producible_controls.isdisjoint(ids):
            raise TokenizerError(f"{self.model_path}: text encoded to a control id "
                                 f"{sorted(self._producible_controls.intersection(ids))[:3]} (its BPE model holds "
                                 "a special token as a regular piece)")
        return ids

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str | None:
        return self.tk.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        return self.find_piece(piece)


def extend_hf_tokenizer(tokenizer_json: str, config: dict, name: str = "the base tokenizer") -> tuple[str, dict]:
    """SOLO's pieces added to a ``tokenizer.json`` (special added tokens, after the base's full length, in
    SOLO's order; Qwen's chat markers reused) and to its ``tokenizer_config.json``'s
    ``added_tokens_decoder``; returns both (the JSON text and the config dict)."""
    base = HFTokenizer(name, tokenizer_json=tokenizer_json, config=config)
    if base.find_piece(VISION_START) is not None:
        raise ValueError(f"this tokenizer already holds SOLO's pieces ({base.vocab_size} pieces); use it as it is")
    vocab = derive_vocab(base)
    data = json.loads(tokenizer_json)
    decoder = dict(config.get("added_tokens_decoder") or {})
    for piece, i in vocab.piece_ids().items():
        if i < vocab.base_size:
            continue
        entry = {"content": piece, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True}
        data["added_tokens"].append({"id": i, **entry})
        decoder[str(i)] = entry
    return json.dumps(data, ensure_ascii=False, indent=2), {**config, "added_tokens_decoder": decoder}


# --- the tool ------------------------------------------------------------------------------------------
def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def create_solo_tokenizer(base: str, output_dir: str) -> str:
    """Extend the base tokenizer at ``base`` (a ``tokenizer.model``, a ``tokenizer.json`` with its
    ``tokenizer_config.json``, or a directory of either) into ``output_dir``, as the same kind; check the
    ids; return the path of the written tokenizer file."""
    kind, file = tokenizer_file(base)
    os.makedirs(output_dir, exist_ok=True)
    if kind == SENTENCEPIECE:
        with open(file, "rb") as f:
            data = extend_sentencepiece_model(f.read())
        out = os.path.join(output_dir, SP_FILE)
        SoloTokenizer.from_processor(_sp_processor(data), out).check_solo_ids()
        _write_atomic(out, data)
        return out
    with open(file, encoding="utf-8") as f:
        text, config = extend_hf_tokenizer(f.read(), read_hf_config(file), file)
    cfg_out, out = os.path.join(output_dir, HF_CONFIG), os.path.join(output_dir, HF_FILE)
    HFTokenizer(out, tokenizer_json=text, config=config).check_solo_ids()
    _write_atomic(cfg_out, (json.dumps(config, ensure_ascii=False, indent=2) + "\n").encode())
    _write_atomic(out, text.encode())  # last: the tokenizer file is what a reader looks for
    return out


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
