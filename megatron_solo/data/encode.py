"""Documents -> token ids, per-token roles and uint8 patches (SOLO_SPEC "Token layout", "Documents").

A document is a list of messages ``{"role", "content"}``; content is a string or a list of parts
``{"type": "text", "text"}``, ``{"type": "image_url", "image_url": {"url"}}`` or, beyond SOLO,
``{"type": "video", "frames": [url, ...]}``. :func:`normalize_messages` accepts the input shapes of
the issue (bare list, ``{"messages"}``, ``{"conversations"}``, a single message, LLaVA's
``from``/``value`` turns with ``<image>``).

Layout of one image of R x C patches (:func:`image_block_tokens`)::

    <vision> (<vpatch> x C <vrow_sep>) x (R-1)  <vpatch> x C </vision>

A video is one block whose frames are separated by ``<vframe_sep>`` (:func:`video_block_tokens`)::

    <vision> frame_1 grid <vframe_sep> frame_2 grid ... </vision>

Text runs (maximal text between two image blocks inside one message, with the chat markers of the
``chat`` format) are encoded with one SentencePiece call each; the lone "▁" that SentencePiece's
dummy prefix puts before a run starting with a special piece or a newline is dropped, so a chat
document encodes exactly as its whole ChatML string would.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field

import numpy as np

from megatron_solo.data.errors import SkipRecord
from megatron_solo.data.image import DEFAULT_MAX_IMAGE_PIXELS, image_to_patches, load_image
from megatron_solo.spec import (
    ASSISTANT,
    BOS_ID,
    IMAGE,
    ROLE_CODES,
    PATCH_DIM,
    IM_END,
    IM_START,
    SOLO_IDS,
    SOLO_SPECIAL_PIECES,
    VISION_END,
    VISION_FRAME_SEP,
    VISION_PATCH,
    VISION_ROW_SEP,
    VISION_START,
)

FORMATS = ("pretrain", "chat")
_VISION_PIECES = (VISION_START, VISION_PATCH, VISION_ROW_SEP, VISION_FRAME_SEP, VISION_END)
_VISION_RE = re.compile("(" + "|".join(re.escape(p) for p in _VISION_PIECES) + ")")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


def image_block_tokens(n_rows: int, n_cols: int, ids=SOLO_IDS) -> np.ndarray:
    """``<vision>`` + rows of ``<vpatch>`` separated by ``<vrow_sep>`` + ``</vision>`` (int32)."""
    return np.concatenate(([ids.vision_start], _grid_tokens(n_rows, n_cols, ids), [ids.vision_end])).astype(np.int32)


def _grid_tokens(n_rows: int, n_cols: int, ids=SOLO_IDS) -> np.ndarray:
    if n_rows < 1 or n_cols < 1:
        raise ValueError(f"an image needs at least one patch, got {n_rows}x{n_cols}")
    row = np.full(n_cols + 1, ids.vision_patch, dtype=np.int32)
    row[-1] = ids.vision_row_sep
    return np.tile(row, n_rows)[:-1]


def video_block_tokens(grids: list[tuple[int, int]], ids=SOLO_IDS) -> np.ndarray:
    """One ``<vision>`` block for video frames of the given (n_rows, n_cols), ``<vframe_sep>`` between."""
    if not grids:
        raise ValueError("a video needs at least one frame")
    parts = [np.array([ids.vision_start], np.int32)]
    for i, (r, c) in enumerate(grids):
        if i:
            parts.append(np.array([ids.vision_frame_sep], np.int32))
        parts.append(_grid_tokens(r, c, ids))
    parts.append(np.array([ids.vision_end], np.int32))
    return np.concatenate(parts)


def image_block_length(n_rows: int, n_cols: int) -> int:
    return n_rows * n_cols + (n_rows - 1) + 2


# --------------------------------------------------------------------------------------- messages
@dataclass
class Message:
    role: str
    parts: list  # ("text", str) | ("image", src) | ("video", [src, ...]); src: str url/path or bytes


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


def _llava_turn(turn: dict, take_image, where: str) -> Message:
    """One LLaVA turn; each ``<image>`` in its text takes ``take_image()`` at that place."""
    role = _LLAVA_ROLES.get(turn.get("from"))
    if role is None:
        raise SkipRecord("unknown_role", f"{where}: LLaVA 'from' {turn.get('from')!r}")
    value = turn.get("value")
    if not isinstance(value, str):
        raise SkipRecord("missing_field", f"{where}: LLaVA turn without a string 'value'")
    parts = []
    for i, piece in enumerate(value.split("<image>")):
        if i:
            parts.append(("image", take_image()))
        if piece:
            parts.append(("text", piece))
    return Message(role, parts)


def _no_image(where: str):
    def take():
        raise SkipRecord("missing_field", f"{where}: '<image>' in text but no 'image' field")

    return take


def normalize_messages(record, where: str = "") -> list[Message]:
    """Any accepted record shape -> list of :class:`Message` (raises :class:`SkipRecord`)."""
    if isinstance(record, dict) and "conversations" in record and isinstance(record["conversations"], list) \
            and record["conversations"] and isinstance(record["conversations"][0], dict) \
            and "from" in record["conversations"][0]:
        image = record.get("image")
        used = [False]
        if isinstance(image, list):  # multi-image LLaVA: images fill <image> slots in order
            pending = list(image)

            def take_image():
                if not pending:
                    raise SkipRecord("missing_field", f"{where}: more '<image>' than images")
                return pending.pop(0)
        elif image is None:
            take_image = _no_image(where)
        else:
            def take_image():
                used[0] = True
                return image
        msgs = []
        for turn in record["conversations"]:
            if not isinstance(turn, dict):
                raise SkipRecord("missing_field", f"{where}: a conversation turn is not an object")
            msgs.append(_llava_turn(turn, take_image, where))
        if image is not None and not used[0] and not isinstance(image, list):
            # LLaVA convention: no placeholder -> the image opens the first human turn
            first = next((m for m in msgs if m.role == "user"), msgs[0])
            first.parts.insert(0, ("image", image))
        return msgs
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
    msgs = []
    for m in record:
        if not isinstance(m, dict):
            raise SkipRecord("missing_field", f"{where}: a message is not an object")
        if "from" in m and "role" not in m:
            msgs.append(_llava_turn(m, _no_image(where), where))
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


# --------------------------------------------------------------------------------------- encoder
@dataclass
class EncodedDocument:
    tokens: np.ndarray  # int32 [t]
    roles: np.ndarray  # uint8 [t]
    patches: np.ndarray  # uint8 [n, 3072], in <vpatch> order
    n_images: int = 0  # images + video frames
    n_image_tokens: int = 0  # tokens of vision blocks (markers included)


@dataclass
class DocumentEncoder:
    """Encodes normalized messages with a :class:`~megatron_solo.data.tokenizer.SoloTokenizer`."""

    tokenizer: object
    fmt: str = "pretrain"
    image_root: str | None = None
    exif_transpose: bool = True
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    _space_id: int = field(init=False, default=-1)

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.fmt!r}")
        self._space_id = self.tokenizer.piece_to_id("▁")
        self._specials = tuple(SOLO_SPECIAL_PIECES)

    # text ----------------------------------------------------------------------------------
    def encode_run(self, text: str) -> list[int]:
        """One text run -> ids (see the module docstring for the dummy-prefix rule)."""
        if not text:
            return []
        out: list[int] = []
        for i, chunk in enumerate(_VISION_RE.split(text)):
            if not chunk:
                continue
            if i % 2:  # literal "<vision>"-like text in content: spell it out, never a vision token
                out.extend(self._spell(chunk))
            else:
                ids = self.tokenizer.encode(chunk)
                if ids and ids[0] == self._space_id and (chunk[0] == "\n" or chunk.startswith(self._specials)):
                    ids = ids[1:]
                out.extend(ids)
        return out

    def _spell(self, piece: str) -> list[int]:
        sp = self.tokenizer.sp
        ids = []
        for ch in piece:
            i = sp.piece_to_id(ch)
            if i == sp.unk_id():
                ids.extend(sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode("utf-8"))
            else:
                ids.append(i)
        return ids

    # images --------------------------------------------------------------------------------
    def load_patches(self, src):
        data = read_image_source(src, self.image_root)
        img = load_image(data, exif_transpose=self.exif_transpose, max_image_pixels=self.max_image_pixels)
        return image_to_patches(img)

    # documents -----------------------------------------------------------------------------
    def encode(self, messages: list[Message], where: str = "") -> EncodedDocument:
        if not messages:
            raise SkipRecord("empty_document", where)
        chat = self.fmt == "chat"
        toks: list = []
        roles: list = []
        patches: list = []
        n_images = n_image_tokens = 0
        has_content = False

        def add(ids, role):
            if len(ids):
                toks.append(np.asarray(ids, dtype=np.int32))
                roles.append(np.full(len(ids), role, dtype=np.uint8))

        first_role = ASSISTANT if not chat else ROLE_CODES[messages[0].role]
        add([BOS_ID], first_role)
        for m in messages:
            role = ROLE_CODES[m.role] if chat else ASSISTANT
            pending = f"{IM_START}{m.role}\n" if chat else ""
            for kind, value in m.parts:
                if kind == "text":
                    pending += value
                    has_content = has_content or bool(value.strip())
                    continue
                add(self.encode_run(pending), role)
                pending = ""
                if kind == "image":
                    p, r, c = self.load_patches(value)
                    block = image_block_tokens(r, c)
                    patches.append(p)
                    n_images += 1
                else:
                    grids = []
                    for frame in value:
                        p, r, c = self.load_patches(frame)
                        patches.append(p)
                        grids.append((r, c))
                        n_images += 1
                    block = video_block_tokens(grids)
                add(block, IMAGE)
                n_image_tokens += len(block)
                has_content = True
            if chat:
                pending += f"{IM_END}\n"
            add(self.encode_run(pending), role)
        if not has_content:
            raise SkipRecord("empty_document", where)
        tokens = np.concatenate(toks)
        return EncodedDocument(
            tokens=tokens,
            roles=np.concatenate(roles),
            patches=np.concatenate(patches) if patches else np.zeros((0, PATCH_DIM), np.uint8),
            n_images=n_images,
            n_image_tokens=n_image_tokens,
        )
