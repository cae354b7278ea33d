"""Documents -> token ids, per-token roles and uint8 patches (docs/DATA_FORMAT.md "Token layout", "Formats").

A document is a list of messages ``{"role", "content"}``; content is a string or a list of parts
``{"type": "text", "text"}``, ``{"type": "image_url", "image_url": {"url"}}`` or, beyond SOLO,
``{"type": "video", "frames": [url, ...]}``. :func:`normalize_messages` accepts the input shapes of
the issue (bare list, ``{"messages"}``, ``{"conversations"}``, a single message, LLaVA's
``from``/``value`` turns with ``<image>``).

Layout of one image of R x C patches (:func:`image_block_tokens`)::

    <vision> (<vpatch> x C <vrow_sep>) x (R-1)  <vpatch> x C </vision>      --row-separator on (SOLO)
    <vision> <vpatch> x (R*C) </vision>                                     --row-separator off (SAIL)

With separators off the grid is not in the tokens: a patch's (row, col) comes from its image
(``patch_coords``, :mod:`megatron_solo.data.patch_coords`).

A video is one block whose frames are separated by ``<vframe_sep>`` (:func:`video_block_tokens`)::

    <vision> frame_1 grid <vframe_sep> frame_2 grid ... </vision>

Control ids only by construction: every id >= 32000 (and BOS/EOS) is placed here because the format
calls for it (image blocks, chat markers, an explicit ``{"type": "loc", "loc": N}`` part for
grounding). Text is always text: it is encoded by the tokenizer's base model
(:meth:`~megatron_solo.data.tokenizer.SoloTokenizer.encode`), so a typed ``<|im_end|>``, ``<vpatch>``,
``<loc_5>``, ``<s>`` or ``</s>`` stays plain text pieces, whichever way the tokenizer file marks SOLO's
pieces. A text segment that starts a run (after BOS or an image block) gets SentencePiece's dummy
prefix "▁" (dropped when it starts with a newline); one that follows a control id (``<|im_start|>``,
``<|im_end|>``, ``<loc_N>``) gets none. So a chat document without forged markers encodes exactly as
its whole ChatML string did through SentencePiece.

Chat templates (``--chat-template``, docs/DATA_FORMAT.md) are rows of
:mod:`megatron_solo.data.chat_templates`: ``chatml`` (the default) and ``solo-inst`` (what SOLO's
released instruction tuning fed SOLO-7B: image blocks first, each closed with ``<vision>``, then BOS,
``[INST] {user text.strip()} [/INST]`` per user turn, assistant text + EOS).
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field

import numpy as np

from megatron_solo.data.chat_templates import CHAT_TEMPLATES, PRETRAIN, TEMPLATES, ChatTemplate, Control, missing_controls
from megatron_solo.data.errors import SkipRecord
from megatron_solo.data.image import DEFAULT_MAX_IMAGE_PIXELS, image_to_patches, load_image
from megatron_solo.data.image_storage import ImageRefs, store_image
from megatron_solo.spec import (
    ASSISTANT,
    IMAGE,
    NUM_LOC_TOKENS,
    PATCH_DIM,
    ROLE_CODES,
    SOLO_IDS,
    USER,
    SoloTokenIds,
    SoloVocab,
)

FORMATS = ("pretrain", "chat")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


def image_block_tokens(n_rows: int, n_cols: int, ids=SOLO_IDS, row_separator: bool = True) -> np.ndarray:
    """``<vision>`` + rows of ``<vpatch>`` (separated by ``<vrow_sep>`` when ``row_separator``) +
    ``</vision>`` (int32)."""
    return np.concatenate(([ids.vision_start], _grid_tokens(n_rows, n_cols, ids, row_separator),
                           [ids.vision_end])).astype(np.int32)


def _grid_tokens(n_rows: int, n_cols: int, ids=SOLO_IDS, row_separator: bool = True) -> np.ndarray:
    if n_rows < 1 or n_cols < 1:
        raise ValueError(f"an image needs at least one patch, got {n_rows}x{n_cols}")
    if not row_separator:
        return np.full(n_rows * n_cols, ids.vision_patch, dtype=np.int32)
    row = np.full(n_cols + 1, ids.vision_patch, dtype=np.int32)
    row[-1] = ids.vision_row_sep
    return np.tile(row, n_rows)[:-1]


def video_block_tokens(grids: list[tuple[int, int]], ids=SOLO_IDS, row_separator: bool = True) -> np.ndarray:
    """One ``<vision>`` block for video frames of the given (n_rows, n_cols), ``<vframe_sep>`` between."""
    if not grids:
        raise ValueError("a video needs at least one frame")
    parts = [np.array([ids.vision_start], np.int32)]
    for i, (r, c) in enumerate(grids):
        if i:
            parts.append(np.array([ids.vision_frame_sep], np.int32))
        parts.append(_grid_tokens(r, c, ids, row_separator))
    parts.append(np.array([ids.vision_end], np.int32))
    return np.concatenate(parts)


def image_block_length(n_rows: int, n_cols: int, row_separator: bool = True) -> int:
    return n_rows * n_cols + (n_rows - 1 if row_separator else 0) + 2


# --------------------------------------------------------------------------------------- messages
@dataclass
class Message:
    role: str
    parts: list  # ("text", str) | ("image", src) | ("video", [src, ...]) | ("loc", N); src: str url/path or bytes


def _parse_content(content, where: str) -> list:
    if isinstance(content, str):
        return [("text", content)]
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise SkipRecord("missing_field", f"{where}: content must be a string or a list of parts")
    parts = []
    for p in content:
        if isinstance(p, str):
            parts.append(("text", p))
            continue
        if not isinstance(p, dict) or "type" not in p:
            raise SkipRecord("missing_field", f"{where}: a content part without 'type'")
        t = p["type"]
        if t == "text":
            if not isinstance(p.get("text"), str):
                raise SkipRecord("missing_field", f"{where}: text part without a string 'text'")
            parts.append(("text", p["text"]))
        elif t in ("image_url", "image"):
            v = p.get(t)
            url = v.get("url") if isinstance(v, dict) else v
            if not isinstance(url, (str, bytes)) or not url:
                raise SkipRecord("missing_field", f"{where}: {t} part without a url")
            parts.append(("image", url))
        elif t == "loc":  # grounding: an explicit location token <loc_N>, N in 1..1024
            n = p.get("loc")
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= NUM_LOC_TOKENS:
                raise SkipRecord("missing_field", f"{where}: loc part needs an int 'loc' in 1..{NUM_LOC_TOKENS}")
            parts.append(("loc", n))
        elif t == "video":
            frames = p.get("frames")
            if not isinstance(frames, list) or not frames:
                raise SkipRecord("missing_field", f"{where}: video part without a non-empty 'frames' list")
            urls = []
            for f in frames:
                u = f.get("url") if isinstance(f, dict) else f
                if not isinstance(u, (str, bytes)) or not u:
                    raise SkipRecord("missing_field", f"{where}: a video frame without a url")
                urls.append(u)
            parts.append(("video", urls))
        else:
            raise SkipRecord("unknown_part_type", f"{where}: part type {t!r}")
    return parts


IMAGE_PLACEHOLDER = "<image>"


def _llava_turn(turn: dict, where: str) -> tuple[str, str]:
    role = _LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
    if not isinstance(turn, dict):
        raise SkipRecord("missing_field", f"{where}: a conversation turn is not an object")
    if role is None:
        raise SkipRecord("unknown_role", f"{where}: LLaVA 'from' {turn.get('from')!r}")
    value = turn.get("value")
    if not isinstance(value, str):
        raise SkipRecord("missing_field", f"{where}: LLaVA turn without a string 'value'")
    return role, value


def _llava_messages(turns: list, image, where: str, allow_image_mismatch: bool = False) -> list[Message]:
    """LLaVA turns -> messages; each ``<image>`` takes the next image at that place.

    The placeholders must match the images: a single ``image`` takes one ``<image>`` (none: it opens
    the first human turn, LLaVA's convention), a list takes exactly one per image, no ``image`` takes
    none; and no image stands in an assistant turn. Otherwise the record is skipped
    (``image_placeholder_mismatch`` / ``image_in_assistant_turn``). ``allow_image_mismatch``
    (``--allow-image-placeholder-mismatch``) keeps the old lenient reading: a single image fills every
    ``<image>`` and assistant turns may hold one (a list must still match one to one).
    """
    pairs = [_llava_turn(t, where) for t in turns]
    counts = [v.count(IMAGE_PLACEHOLDER) for _, v in pairs]
    total = sum(counts)
    if not allow_image_mismatch and any(c and r == "assistant" for (r, _), c in zip(pairs, counts)):
        raise SkipRecord("image_in_assistant_turn", f"{where}: '<image>' in a gpt/assistant turn")
    if image is None:
        images = []
    elif isinstance(image, list):
        images = list(image)
    else:
        images = [image] * max(total, 1) if allow_image_mismatch else [image]
    if total != len(images) and not (total == 0 and len(images) == 1 and not isinstance(image, list)):
        raise SkipRecord("image_placeholder_mismatch",
                         f"{where}: {total} '<image>' placeholder(s) for {len(images) if image is not None else 0} "
                         "image(s)")
    msgs, k = [], 0
    for role, value in pairs:
        parts = []
        for i, piece in enumerate(value.split(IMAGE_PLACEHOLDER)):
            if i:
                parts.append(("image", images[k]))
                k += 1
            if piece:
                parts.append(("text", piece))
        msgs.append(Message(role, parts))
    if total == 0 and images:  # LLaVA convention: no placeholder -> the image opens the first human turn
        first = next((m for m in msgs if m.role == "user"), msgs[0])
        first.parts.insert(0, ("image", images[0]))
    return msgs


def normalize_messages(record, where: str = "", allow_image_mismatch: bool = False) -> list[Message]:
    """Any accepted record shape -> list of :class:`Message` (raises :class:`SkipRecord`)."""
    if isinstance(record, dict) and "conversations" in record and isinstance(record["conversations"], list) \
            and record["conversations"] and isinstance(record["conversations"][0], dict) \
            and "from" in record["conversations"][0]:
        return _llava_messages(record["conversations"], record.get("image"), where, allow_image_mismatch)
    if isinstance(record, dict):
        if "messages" in record:
            record = record["messages"]
        elif "conversations" in record:
            record = record["conversations"]
        elif "role" in record or "content" in record:
            record = [record]
        else:
            raise SkipRecord("missing_field", f"{where}: no 'messages', 'conversations' or 'content'")
    if not isinstance(record, list):
        raise SkipRecord("missing_field", f"{where}: a document must be a list of messages")
    if record and all(isinstance(m, dict) and "from" in m and "role" not in m for m in record):
        return _llava_messages(record, None, where, allow_image_mismatch)  # bare LLaVA turns: no image
    msgs = []
    for m in record:
        if not isinstance(m, dict):
            raise SkipRecord("missing_field", f"{where}: a message is not an object")
        if "from" in m and "role" not in m:  # a LLaVA turn among chat messages: it has no image to place
            msgs.extend(_llava_messages([m], None, where, allow_image_mismatch))
            continue
        role = m.get("role")
        if role is None or "content" not in m:
            raise SkipRecord("missing_field", f"{where}: a message without 'role' or 'content'")
        if role not in ROLE_CODES:
            raise SkipRecord("unknown_role", f"{where}: role {role!r}")
        msgs.append(Message(role, _parse_content(m["content"], where)))
    return msgs


# --------------------------------------------------------------------------------------- images
def read_image_source(src, image_root: str | None) -> bytes:
    """A data URL, a local path (relative to ``image_root``) or raw bytes -> the encoded bytes."""
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    if src.startswith("data:"):
        head, sep, payload = src.partition(",")
        if not sep or ";base64" not in head:
            raise SkipRecord("bad_base64", "data URL without ';base64,'")
        try:
            return base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            raise SkipRecord("bad_base64", str(e)) from None
    if "://" in src and not src.startswith("file://"):
        raise SkipRecord("unsupported_url", src[:80])
    path = src[len("file://"):] if src.startswith("file://") else src
    if image_root and not os.path.isabs(path):
        path = os.path.join(image_root, path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise SkipRecord("missing_image_file", path) from None
    except OSError as e:
        raise SkipRecord("missing_image_file", f"{path}: {e}") from None


def image_source_name(src, image_root: str | None) -> str:
    """How a message names an image source: its path (under ``image_root``), or what kind of inline data."""
    if isinstance(src, (bytes, bytearray)):
        return "an image embedded in the record"
    if src.startswith("data:"):
        return "a data: URL image"
    path = src[len("file://"):] if src.startswith("file://") else src
    return os.path.join(image_root, path) if image_root and not os.path.isabs(path) else path


# --------------------------------------------------------------------------------------- encoder
@dataclass
class EncodedDocument:
    tokens: np.ndarray  # int32 [t]
    roles: np.ndarray  # uint8 [t]
    patches: np.ndarray  # uint8 [n, 3072], in <vpatch> order
    n_images: int = 0  # images + video frames
    n_image_tokens: int = 0  # tokens of vision blocks (markers included)
    images_dropped: tuple = ()  # reasons of the optional images left out (interleaved documents)
    grids: tuple = ()  # (n_rows, n_cols) of each image (video frame), in <vpatch> order


class _DocumentParts:
    """A document being built: token runs with their roles, the patches in ``<vpatch>`` order."""

    def __init__(self):
        self.tokens: list = []
        self.roles: list = []
        self.patches: list = []
        self.grids: list = []  # (n_rows, n_cols) per image, in patch order
        self.n_images = 0
        self.n_image_tokens = 0
        self.dropped: list = []  # reasons of optional images left out

    def add(self, ids, role: int) -> None:
        if len(ids):
            self.tokens.append(np.asarray(ids, dtype=np.int32))
            self.roles.append(np.full(len(ids), role, dtype=np.uint8))

    def add_vision(self, block: np.ndarray, n_images: int) -> None:
        self.add(block, IMAGE)
        self.n_images += n_images
        self.n_image_tokens += len(block)


def _trimmed(parts: list) -> list:
    """A message's parts with its text stripped at both ends (Jinja's ``trim`` of the whole content):
    whitespace of the text parts before the first and after the last non-text part or character."""
    parts = list(parts)
    for order in (range(len(parts)), range(len(parts) - 1, -1, -1)):
        for i in order:
            kind, value = parts[i]
            if kind != "text":
                break
            value = value.lstrip() if order.step == 1 else value.rstrip()
            parts[i] = (kind, value)
            if value:
                break
    return parts


@dataclass
class DocumentEncoder:
    """Encodes normalized messages with a :class:`~megatron_solo.data.tokenizer.SoloTokenizer`.

    ``fmt``: "pretrain" (BOS + parts, all text role assistant) or "chat" (laid out by the
    ``chat_template`` row of :data:`~megatron_solo.data.chat_templates.TEMPLATES`). ``allow_image_mismatch``
    is read by :func:`normalize_messages` callers (``preprocess.encode_record``). ``ids``: every token id
    the encoder places (BOS, EOS, vision blocks, chat and location markers) comes from it; by default the
    tokenizer's :class:`~megatron_solo.spec.SoloVocab`. A base without BOS (Qwen) opens no document with
    one, and closes each pre-training document with EOS (its ``<|endoftext|>``), as it was pre-trained.
    """

    tokenizer: object
    fmt: str = "pretrain"
    image_root: str | None = None
    exif_transpose: bool = True
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    chat_template: str = "chatml"
    allow_image_mismatch: bool = False
    image_storage: str = "patches"  # "encoded": patches are ImageRefs (megatron_solo.data.image_storage)
    ids: SoloVocab | SoloTokenIds | None = None
    row_separator: bool = True  # --row-separator: <vrow_sep> between rows of patches (SOLO) or none (SAIL)
    template: ChatTemplate = field(init=False)
    _space_id: int = field(init=False, default=-1)

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.fmt!r}")
        if self.chat_template not in TEMPLATES:
            raise ValueError(f"chat template must be one of {CHAT_TEMPLATES}, got {self.chat_template!r}")
        self.template = TEMPLATES[self.chat_template] if self.fmt == "chat" else PRETRAIN
        if self.ids is None:
            self.ids = self.tokenizer.vocab
        missing = missing_controls(self.template, self.ids)
        if missing:
            raise ValueError(f"chat template {self.chat_template} places the base's own {', '.join(missing)} "
                             f"token(s), which this tokenizer's base does not have; choose another --chat-template")
        self._space_id = self.tokenizer.piece_to_id("▁")

    # text ----------------------------------------------------------------------------------
    def encode_text(self, text: str, after_control: bool = False) -> list[int]:
        """Text -> ids of text pieces only. ``after_control``: the text follows a control id in the same
        run (no dummy prefix); else it starts a run (dummy "▁", dropped before a leading newline)."""
        if not text:
            return []
        if after_control:
            return self.tokenizer.encode(text, dummy_prefix=False)
        ids = self.tokenizer.encode(text)
        if ids and ids[0] == self._space_id and text[0] == "\n":
            ids = ids[1:]
        return ids

    # images --------------------------------------------------------------------------------
    def load_patches(self, src):
        data = read_image_source(src, self.image_root)
        try:
            if self.image_storage == "encoded":
                return store_image(data, exif_transpose=self.exif_transpose, max_image_pixels=self.max_image_pixels)
            img = load_image(data, exif_transpose=self.exif_transpose, max_image_pixels=self.max_image_pixels)
        except SkipRecord as e:  # the decoder sees bytes only: name the file they came from
            raise SkipRecord(e.reason, f"{image_source_name(src, self.image_root)}: {e.detail}") from None
        return image_to_patches(img)

    def _vision_block(self, kind, value, doc: _DocumentParts) -> tuple[np.ndarray, int]:
        """(block tokens, number of images) of an image or video part; appends its patches and grids."""
        if kind in ("image", "image?"):
            p, r, c = self.load_patches(value)
            doc.patches.append(p)
            doc.grids.append((r, c))
            return image_block_tokens(r, c, self.ids, self.row_separator), 1
        grids = []
        for frame in value:
            p, r, c = self.load_patches(frame)
            doc.patches.append(p)
            grids.append((r, c))
        doc.grids.extend(grids)
        return video_block_tokens(grids, self.ids, self.row_separator), len(grids)

    # documents -----------------------------------------------------------------------------
    def encode(self, messages: list[Message], where: str = "") -> EncodedDocument:
        if not messages:
            raise SkipRecord("empty_document", where)
        if self.template.layout == "inst":
            return self._encode_inst(messages, where)
        return self._encode_turns(messages, where)

    def _markers(self, pieces: tuple, role: str) -> list:
        """A template's turn markers as parts: ("control", id) or ("marker", text)."""
        return [("control", getattr(self.ids, p.name)) if isinstance(p, Control) else ("marker", p.format(role=role))
                for p in pieces]

    def _encode_turns(self, messages: list[Message], where: str) -> EncodedDocument:
        """Every message in place between the template's turn markers. Text is gathered into runs
        between control ids and image blocks, each run encoded at once (template text included)."""
        t = self.template
        doc = _DocumentParts()
        has_content = False
        if t.bos and self.ids.bos is not None:
            doc.add([self.ids.bos], ROLE_CODES[t.text_role or messages[0].role])
        for m in messages:
            role = ROLE_CODES[t.text_role or m.role]
            pending, after_ctl = "", False
            parts = _trimmed(m.parts) if t.trim else m.parts
            for kind, value in [*self._markers(t.turn_open, m.role), *parts, *self._markers(t.turn_close, m.role)]:
                if kind in ("text", "marker"):
                    pending += value
                    has_content = has_content or (kind == "text" and bool(value.strip()))
                    continue
                doc.add(self.encode_text(pending, after_ctl), role)
                pending = ""
                if kind in ("loc", "control"):
                    doc.add([self.ids.loc_first + value - 1 if kind == "loc" else value], role)
                    after_ctl = True
                    continue
                after_ctl = False  # a dropped image ends the text run too: its neighbours stay apart
                if kind == "dropped":  # an optional image left out before encoding (megatron_solo.data.interleaved)
                    doc.dropped.append(value)
                    continue
                try:
                    doc.add_vision(*self._vision_block(kind, value, doc))
                except SkipRecord as e:
                    if kind != "image?":  # only an optional image is dropped; any other skips the record
                        raise
                    doc.dropped.append(e.reason)
                    continue
                has_content = True
            doc.add(self.encode_text(pending, after_ctl), role)
        if not has_content:
            raise SkipRecord("empty_document", where, images_dropped=doc.dropped)
        if t is PRETRAIN and self.ids.bos is None:
            doc.add([self.ids.eos], ROLE_CODES[t.text_role])
        return self._document(doc)

    def _encode_inst(self, messages: list[Message], where: str) -> EncodedDocument:
        """SOLO's released instruction format (docs/DATA_FORMAT.md "Formats"): every image block first, closed
        with the template's ``image_close``; BOS; ``user_turn`` around each user text (stripped; an
        image's adjacent newline removed: the one after it, else the one before it), assistant text +
        ``answer_end``. Each piece is encoded on its own (dummy prefix, no BOS/EOS). A system message's
        text opens the first user turn, followed by a blank line (Mistral's habit; SOLO's data had none)."""
        t = self.template
        doc = _DocumentParts()
        turns, system = [], []
        for m in messages:
            texts, parts = [], list(m.parts)
            for i in range(len(parts)):
                kind, value = parts[i]
                if kind == "text":
                    texts.append(value)
                    continue
                if kind == "loc":
                    raise SkipRecord("unknown_part_type", f"{where}: loc parts need --chat-template chatml")
                if m.role != "user":
                    raise SkipRecord("image_in_assistant_turn",
                                     f"{where}: {t.name} places images only in user turns, found one in {m.role}")
                block, n = self._vision_block(kind, value, doc)
                if t.image_close:
                    block = block.copy()
                    block[-1] = getattr(self.ids, t.image_close)
                doc.add_vision(block, n)
                nxt = parts[i + 1] if i + 1 < len(parts) else None
                if nxt and nxt[0] == "text" and nxt[1].startswith("\n"):
                    parts[i + 1] = ("text", nxt[1][1:])
                elif texts and texts[-1].endswith("\n"):
                    texts[-1] = texts[-1][:-1]
            text = "".join(texts)
            if m.role == "system":
                system.append(text)
            else:
                turns.append((m.role, text))
        if not turns:
            raise SkipRecord("empty_document", f"{where}: {t.name} needs a user or assistant turn")
        if system:
            first_user = next((k for k, (r, _) in enumerate(turns) if r == "user"), None)
            if first_user is None:
                raise SkipRecord("empty_document", f"{where}: a system message without a user turn")
            turns[first_user] = ("user", "\n\n".join(system) + "\n\n" + turns[first_user][1])
        if t.bos and self.ids.bos is not None:
            doc.add([self.ids.bos], USER)
        has_content = doc.n_images > 0
        for role, text in turns:
            has_content = has_content or bool(text.strip())
            if role == "user":
                doc.add(self.tokenizer.encode(t.user_turn.format(text=text.strip())), USER)
            else:
                end = [getattr(self.ids, t.answer_end)] if t.answer_end else []
                doc.add(self.tokenizer.encode(text) + end, ASSISTANT)
        if not has_content:
            raise SkipRecord("empty_document", where)
        return self._document(doc)

    def _document(self, doc: _DocumentParts) -> EncodedDocument:
        return EncodedDocument(
            tokens=np.concatenate(doc.tokens),
            roles=np.concatenate(doc.roles),
            patches=(ImageRefs.concat(doc.patches) if self.image_storage == "encoded" else
                     np.concatenate(doc.patches) if doc.patches else np.zeros((0, PATCH_DIM), np.uint8)),
            n_images=doc.n_images,
            n_image_tokens=doc.n_image_tokens,
            images_dropped=tuple(doc.dropped),
            grids=tuple(doc.grids),
        )
