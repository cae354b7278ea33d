"""SOLO's fixed facts, in one place (SOLO's paper, arXiv 2407.06438, and its release
``Yangyi-Chen/SOLO``): token ids and pieces, vocabulary sizes and Megatron's padding rule, SOLO's vocabulary over any base (:class:`SoloVocab`; Mistral's is
:data:`MISTRAL_VOCAB`), patch geometry, the image size limit, ImageNet statistics, role codes, and
the one pixel normalisation.

Every module of the package takes these from here. The files exported into a Hugging Face checkpoint
(``convert/hf_files/*.py``) keep their own copies on purpose (an export is self-contained);
``tests/test_spec.py`` proves they agree. Light on purpose: no megatron, numpy or torch at import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import cached_property

# --- vocabulary -----------------------------------------------------------------------------------
BASE_VOCAB_SIZE = 32000  # Mistral-7B-v0.1's SentencePiece model; SOLO's pieces follow it
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

VISION_START = "<vision>"
VISION_PATCH = "<vpatch>"
VISION_ROW_SEP = "<vrow_sep>"
VISION_FRAME_SEP = "<vframe_sep>"
VISION_END = "</vision>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
NUM_LOC_TOKENS = 1024

SOLO_SPECIAL_PIECES: tuple[str, ...] = (
    VISION_START,
    VISION_PATCH,
    VISION_ROW_SEP,
    VISION_FRAME_SEP,
    VISION_END,
    *(f"<loc_{i}>" for i in range(1, NUM_LOC_TOKENS + 1)),
    IM_START,
    IM_END,
)
SOLO_VOCAB_SIZE = BASE_VOCAB_SIZE + len(SOLO_SPECIAL_PIECES)  # 33031

# The SOLO line's image choices (megatron_solo/model/image_blocks.py); the first of each is SOLO's own.
IMAGE_ATTENTION_CHOICES = ("causal", "bidirectional")
IMAGE_POSITIONS_CHOICES = ("1d", "mrope")


def mrope_section(kv_channels: int) -> list[int]:
    """Rotary channel pairs per multimodal position component (temporal, row, column), summing to
    ``kv_channels // 2``: Qwen2-VL's split (16, 24, 24 of 64) for every head size, 3/8 to rows and to
    columns, the rest to time."""
    half = kv_channels // 2
    hw = (3 * half) // 8
    return [half - 2 * hw, hw, hw]


@dataclass(frozen=True)
class SoloTokenIds:
    """SOLO-7B's fixed ids (its release's tokenizer): piece ``SOLO_SPECIAL_PIECES[k]`` has id ``BASE_VOCAB_SIZE + k``."""

    unk: int = UNK_ID
    bos: int = BOS_ID
    eos: int = EOS_ID
    vision_start: int = BASE_VOCAB_SIZE + SOLO_SPECIAL_PIECES.index(VISION_START)  # 32000
    vision_patch: int = BASE_VOCAB_SIZE + SOLO_SPECIAL_PIECES.index(VISION_PATCH)  # 32001
    vision_row_sep: int = BASE_VOCAB_SIZE + SOLO_SPECIAL_PIECES.index(VISION_ROW_SEP)  # 32002
    vision_frame_sep: int = BASE_VOCAB_SIZE + SOLO_SPECIAL_PIECES.index(VISION_FRAME_SEP)  # 32003
    vision_end: int = BASE_VOCAB_SIZE + SOLO_SPECIAL_PIECES.index(VISION_END)  # 32004
    loc_first: int = BASE_VOCAB_SIZE + SOLO_SPECIAL_PIECES.index("<loc_1>")  # 32005
    im_start: int = BASE_VOCAB_SIZE + SOLO_SPECIAL_PIECES.index(IM_START)  # 33029
    im_end: int = BASE_VOCAB_SIZE + SOLO_SPECIAL_PIECES.index(IM_END)  # 33030
    first_special: int = BASE_VOCAB_SIZE  # loss never falls on ids >= this


SOLO_IDS = SoloTokenIds()  # the Mistral case, kept until every user takes a SoloVocab


# docs/DATA_FORMAT.md "Tokenizer and SOLO's vocabulary": the chat markers a base may already hold as special tokens (reused, not added)
REUSABLE_PIECES = (IM_START, IM_END)
# SoloVocab's fields that are single ids of SOLO's pieces, with their piece
_PIECE_FIELDS = (("vision_start", VISION_START), ("vision_patch", VISION_PATCH), ("vision_row_sep", VISION_ROW_SEP),
                 ("vision_frame_sep", VISION_FRAME_SEP), ("vision_end", VISION_END), ("loc_first", "<loc_1>"),
                 ("im_start", IM_START), ("im_end", IM_END))
# The chat tokens a base may hold as special tokens of its own (Llama-3's header and turn-end tokens), by
# SoloVocab field: a chat template row names them (data/chat_templates.py); None where the base has none.
BASE_CHAT_PIECES = {"start_header": "<|start_header_id|>", "end_header": "<|end_header_id|>", "eot": "<|eot_id|>"}


@dataclass(frozen=True)
class SoloVocab:
    """SOLO's ids over one base tokenizer (docs/DATA_FORMAT.md "Tokenizer and SOLO's vocabulary"), derived once from the tokenizer
    (:func:`megatron_solo.data.tokenizer.derive_vocab`) and stored as :meth:`to_dict` in every dataset,
    checkpoint and export, so that ids made with one base never meet a model of another unnoticed.

    ``base_size`` is the base tokenizer's full length (regular vocabulary plus every added or special
    token); SOLO's pieces follow it in SOLO's order, except chat markers the base already has as special
    tokens (Qwen's ``<|im_start|>``/``<|im_end|>``), which keep their ids. ``bos`` is None for a base that
    opens no document with one (Qwen): its documents close with ``eos``. ``pad`` fills batches (never
    trained). ``base_special_ids``: the base's own special tokens (BOS/EOS, end-of-text, chat markers,
    reserved ones); with SOLO's pieces they are the control ids, which text never produces.
    ``start_header``, ``end_header``, ``eot``: the base's own chat tokens of :data:`BASE_CHAT_PIECES`
    (Llama-3's; None for a base without them, and in a vocabulary stored before they were derived).
    """

    base_size: int
    size: int
    vision_start: int
    vision_patch: int
    vision_row_sep: int
    vision_frame_sep: int
    vision_end: int
    loc_first: int  # <loc_k> is loc_first + k - 1
    im_start: int
    im_end: int
    bos: int | None
    eos: int
    pad: int
    base_special_ids: tuple[int, ...]
    start_header: int | None = None
    end_header: int | None = None
    eot: int | None = None

    @classmethod
    def over_base(cls, base_size: int, *, bos: int | None, eos: int, pad: int,
                  base_special_ids, reused: dict | None = None, base_chat: dict | None = None) -> "SoloVocab":
        """SOLO's pieces laid after a base of ``base_size`` ids; ``reused``: {piece: id} of the
        :data:`REUSABLE_PIECES` the base holds as special tokens; ``base_chat``: {field: id} of the
        :data:`BASE_CHAT_PIECES` it holds."""
        reused = dict(reused or {})
        if set(reused) - set(REUSABLE_PIECES):
            raise ValueError(f"only {REUSABLE_PIECES} can be reused from the base, not {sorted(set(reused) - set(REUSABLE_PIECES))}")
        ids, nxt = {}, base_size
        for piece in SOLO_SPECIAL_PIECES:
            if piece in reused:
                ids[piece] = int(reused[piece])
            else:
                ids[piece], nxt = nxt, nxt + 1
        return cls(base_size=int(base_size), size=nxt, bos=None if bos is None else int(bos), eos=int(eos),
                   pad=int(pad), base_special_ids=tuple(sorted({int(i) for i in base_special_ids})),
                   **{f: ids[piece] for f, piece in _PIECE_FIELDS},
                   **{f: int(i) for f, i in (base_chat or {}).items() if f in BASE_CHAT_PIECES})

    def piece_ids(self) -> dict[str, int]:
        """{piece: id} for every one of SOLO's pieces, in SOLO's order."""
        ids = {piece: getattr(self, f) for f, piece in _PIECE_FIELDS}
        for k in range(2, NUM_LOC_TOKENS + 1):
            ids[f"<loc_{k}>"] = self.loc_first + k - 1
        return {piece: ids[piece] for piece in SOLO_SPECIAL_PIECES}

    @cached_property
    def control_ids(self) -> frozenset[int]:
        """SOLO's pieces plus the base's own special tokens: ids that only the encoder places."""
        return frozenset(self.piece_ids().values()) | frozenset(self.base_special_ids)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base_special_ids"] = list(self.base_special_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SoloVocab":
        names = [f.name for f in fields(cls)]
        # a vocabulary stored before the base's chat tokens were derived lacks their fields: None
        if isinstance(d, dict) and set(names) - set(d) <= set(BASE_CHAT_PIECES):
            d = {**dict.fromkeys(BASE_CHAT_PIECES), **d}
        if not isinstance(d, dict) or sorted(d) != sorted(names):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"a stored SOLO vocabulary has the fields {names}, got {got}")
        return cls(**{**d, "base_special_ids": tuple(d["base_special_ids"])})

    def describe(self) -> str:
        """One phrase naming the ids, for error lines."""
        return f"{self.size} ids ({VISION_START}={self.vision_start} after a {self.base_size}-id base)"


def _unrecorded_chat_tokens(a: SoloVocab, b: SoloVocab) -> bool:
    """Whether ``a`` and ``b`` differ only in that one of them is a record made before the base's chat
    tokens (:data:`BASE_CHAT_PIECES`) were derived: all three None there, every other id equal. Such a
    record (a Llama-3 dataset or checkpoint of that time) is the same vocabulary: those tokens are the
    base's own special tokens, at the ids the same base tokenizer gives them, and nothing of that time
    placed them (text never produces a control id)."""
    diff = {f.name for f in fields(SoloVocab) if getattr(a, f.name) != getattr(b, f.name)}
    unrecorded = [v for v in (a, b) if all(getattr(v, f) is None for f in BASE_CHAT_PIECES)]
    return bool(diff) and diff <= set(BASE_CHAT_PIECES) and bool(unrecorded)


def vocab_mismatch(have: SoloVocab, want: SoloVocab, have_what: str, want_what: str) -> str | None:
    """The one check where ids meet (dataset and model, checkpoint and tokenizer): None when ``have`` and
    ``want`` are the same vocabulary (a record made before the base's chat tokens were derived matches the
    vocabulary that has them: :func:`_unrecorded_chat_tokens`), else one line saying both."""
    if have == want or _unrecorded_chat_tokens(have, want):
        return None
    if (have.base_size, have.size, have.vision_start) != (want.base_size, want.size, want.vision_start):
        return f"{have_what} has SOLO's vocabulary of {have.describe()}, {want_what} has {want.describe()}"
    diff = [f.name for f in fields(SoloVocab) if getattr(have, f.name) != getattr(want, f.name)]
    return (f"{have_what} and {want_what} disagree on SOLO's vocabulary ({', '.join(diff)}: "
            f"{[getattr(have, n) for n in diff]} vs {[getattr(want, n) for n in diff]})")[:500]


# Mistral-7B-v0.1's 32000 SentencePiece pieces: <s>=1 and </s>=2 are its special (CONTROL) tokens; <unk>=0
# pads batches (it is what SentencePiece gives unknown text, so it is not a control id). Equal to SOLO_IDS
# (tests/test_spec.py); data stored without a vocabulary is this one.
MISTRAL_VOCAB = SoloVocab.over_base(BASE_VOCAB_SIZE, bos=BOS_ID, eos=EOS_ID, pad=UNK_ID, base_special_ids=(BOS_ID, EOS_ID))

MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128  # Megatron-LM's --make-vocab-size-divisible-by default


def pad_vocab_size(vocab_size: int, tensor_model_parallel_size: int = 1,
                   divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """Megatron's rule: pad the embedding to a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


# --- images ---------------------------------------------------------------------------------------
PATCH_SIZE = 32
PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE  # 3072: one channel-major (3, 32, 32) patch
MAX_LONG_SIDE = 1024  # the resized image's long side never exceeds this
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --- roles (uint8, one per token on disk) ---------------------------------------------------------
SYSTEM, USER, ASSISTANT, IMAGE = 0, 1, 2, 3
ROLE_CODES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
TEXT_ROLES = (SYSTEM, USER, ASSISTANT)
# SOLO's own data marked the BOS between packed documents with role 1000; megatron_solo stores document
# boundaries explicitly (docs/DATA_FORMAT.md) and never writes it. Named so that readers of SOLO's data know it.
SOLO_PACK_SEPARATOR_ROLE = 1000


def normalize_patches(patches, dtype=None):
    """uint8 patches ``[..., 3072]`` (numpy or torch) -> float32 ``(x / 255 - mean[c]) / std[c]``.

    SOLO's step 4 in torchvision's order (ToTensor, then Normalize), computed in float32 on the patches'
    device; SOLO stored the result as float16. Floating-point input is taken as already normalised
    (SOLO's own float16 data, the Hugging Face ``vision_patches`` input) and returned as float32.
    ``dtype`` casts the result.
    """
    import torch

    x = patches if isinstance(patches, torch.Tensor) else torch.as_tensor(patches)
    if x.shape[-1:] != (PATCH_DIM,):
        raise ValueError(f"patches must be [..., {PATCH_DIM}], got {tuple(x.shape)}")
    if x.is_floating_point():
        out = x.float()
    elif x.dtype != torch.uint8:
        raise TypeError(f"patches must be uint8 pixels or normalised floats, got {x.dtype}")
    else:
        shape = x.shape
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1)
        out = x.reshape(*shape[:-1], 3, PATCH_SIZE * PATCH_SIZE).float().div(255.0).sub(mean).div(std)
        out = out.reshape(shape)
    return out if dtype is None else out.to(dtype)
