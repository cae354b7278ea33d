"""Turn images and text into SOLO's inputs: ``input_ids``, ``vision_patches``, ``vision_patch_indices``,
``vision_patch_coords``.

Self-contained (PIL, numpy, torch, sentencepiece) and shipped in every exported SOLO checkpoint. It
implements SOLO's image rules (arXiv 2407.06438 and SOLO's released code):

1. decode, convert to RGB;
2. target size for width W, height H: L = max(W, H), S = min(W, H),
   new_L = min(ceil(L/32)*32, 1024), new_S = ceil(floor(new_L*S/L)/32)*32 (32 when that is 0);
   the long side stays the long side;
3. resize with PIL's bilinear (antialiased) filter;
4. scale to [0, 1] and normalise per channel with ImageNet's mean and std;
5. cut into 32x32 patches, row-major; each patch is flattened channel-major (3, 32, 32) -> 3072.

An image of R x C patches becomes the tokens ``<vision>``, then per row ``<vpatch>`` x C with one
``<vrow_sep>`` between rows, then ``</vision>`` (SOLO's layout). A model trained on data without row
separators (``vision_row_separator: false`` in its config.json; SAIL's layout) gets ``<vision>``, the
R*C ``<vpatch>`` row-major, ``</vision>``. ``vision_patch_coords`` (LongTensor [n, 2]) is each patch's
(row, col) inside its image, in the order of ``vision_patches``: returned when asked
(``return_patch_coords=True`` per call; by default when the export's config.json says its model takes 2D
positions, ``image_positions`` other than "1d", or ``processor_config.json`` says ``return_patch_coords``);
a model that does not take it would refuse it in ``generate``.

Control ids only by construction: text is always encoded by the tokenizer's 32000-piece base model,
so ``<vpatch>``, ``<|im_end|>``, ``<loc_5>``, ``<s>`` typed in a prompt stay plain text; image blocks and
chat markers are placed by the processor; a location token is asked for explicitly with a part
``{"type": "loc", "loc": N}``. The same rules as the training data (megatron_solo.data.encode).

Chat templates (``template=``; default: the one the model was tuned with, ``processor_config.json``'s
``chat_template_name``, else chatml): "chatml" (``<|im_start|>{role}\n`` + content + ``<|im_end|>\n``; the
model stops at ``<|im_end|>``), "solo-inst" (SOLO-7B's released instruction format: image blocks
first, each closed with ``<vision>``; BOS; ``[INST] {text.strip()} [/INST]`` per user turn; answers
end with ``</s>``) and "llama3" (a Llama-3 base's own: BOS, then per message
``<|start_header_id|>{role}<|end_header_id|>\n\n`` + content stripped + ``<|eot_id|>``; the model stops
at ``<|eot_id|>``).

Usage::

    processor = SoloProcessor.from_pretrained(hf_dir)
    inputs = processor([image, "What is in this image?"])            # pre-training style: BOS + parts
    inputs = processor.chat([{"role": "user", "content": [image, "Describe it."]}])  # chat turns
    out = model.generate(**inputs, max_new_tokens=32)                 # stops at <|im_end|> / </s>
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

PATCH_SIZE = 32
MAX_LONG_SIDE = 1024
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BASE_VOCAB_SIZE = 32000  # ids from here on are SOLO's pieces: <vision>=32000 ... <|im_end|>=33030
VISION_START_ID, IM_START_ID, IM_END_ID = 32000, 33029, 33030
LOC_FIRST_ID, NUM_LOC_TOKENS = 32005, 1024  # <loc_1> .. <loc_1024>
CHAT_TEMPLATES = ("chatml", "solo-inst", "llama3")
VISION_START, VISION_PATCH, VISION_ROW_SEP, VISION_END = "<vision>", "<vpatch>", "<vrow_sep>", "</vision>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def target_size(width: int, height: int, patch: int = PATCH_SIZE, max_long: int = MAX_LONG_SIDE) -> tuple[int, int]:
    """(new_width, new_height) of SOLO's resize rule."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    long_side, short_side = max(width, height), min(width, height)
    new_long = min(math.ceil(long_side / patch) * patch, max_long)
    new_short = math.ceil(math.floor(new_long * short_side / long_side) / patch) * patch
    new_short = max(new_short, patch)
    return (new_long, new_short) if width >= height else (new_short, new_long)


def to_rgb(image):
    """Step 1: any PIL mode -> RGB. Transparent pixels are composited on white; 16/32-bit and float
    grey images are scaled to 8 bits (the training data's rules)."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        if mode == "I" and arr.max(initial=0) <= 255:
            scale = 1.0
        elif mode == "I" and arr.max(initial=0) > 65535:
            scale = 1.0 / 16843009.0
        else:
            scale = 1.0 / 257.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str):
    """Open an image file, apply its EXIF orientation, convert to RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def image_to_patches(image) -> tuple[np.ndarray, int, int]:
    """PIL image -> (uint8 patches [R*C, 3072] channel-major, R, C) of the resized pixels."""
    from PIL import Image

    image = to_rgb(image)
    size = target_size(*image.size)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    rows, cols = pixels.shape[0] // PATCH_SIZE, pixels.shape[1] // PATCH_SIZE
    patches = pixels.reshape(rows, PATCH_SIZE, cols, PATCH_SIZE, 3).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(patches.reshape(rows * cols, 3 * PATCH_SIZE * PATCH_SIZE)), rows, cols


def grid_coords(rows: int, cols: int) -> np.ndarray:
    """(row, col) of each patch of a rows x cols grid, row-major (int64 [rows * cols, 2])."""
    k = np.arange(rows * cols, dtype=np.int64)
    return np.stack((k // cols, k % cols), axis=1)


def normalize_patches(patches) -> torch.Tensor:
    """uint8 [n, 3072] -> float32 [n, 3072]: (x / 255 - mean[c]) / std[c], c = channel of the value."""
    x = torch.as_tensor(np.asarray(patches)).to(torch.float32) / 255.0
    n = x.shape[0]
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(1, 3, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(1, 3, 1)
    return ((x.view(n, 3, -1) - mean) / std).view(n, -1)


def _text_only_processor(tokenizer_model: str, dummy_prefix: bool):
    """SentencePiece over the file's first 32000 pieces: no text can become one of SOLO's ids,
    whether the file marks them USER_DEFINED or NORMAL."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    with open(tokenizer_model, "rb") as f:
        proto.ParseFromString(f.read())
    del proto.pieces[BASE_VOCAB_SIZE:]
    proto.trainer_spec.vocab_size = BASE_VOCAB_SIZE
    proto.normalizer_spec.add_dummy_prefix = dummy_prefix
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


#: ChatML, as the training data renders it (<|im_start|>{role}\n ... <|im_end|>\n); given to the
#: tokenizer and the processor so that ``apply_chat_template`` gives the training data's ids.
CHATML_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
# Llama-3's, as Meta ships it in Llama-3-8B-Instruct's tokenizer_config.json (the training data's ``llama3``)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
#: the Jinja form of each template given to the tokenizer (solo-inst has none: the processor's chat() only)
JINJA_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE}
IMAGE_PLACEHOLDER = "<image>"  # where processor(text=..., images=...) places each image, in order
PROCESSOR_CONFIG = "processor_config.json"

# SOLO-7B's (Mistral's) ids; a processor over another base takes its export's ``solo_vocab``.
MISTRAL_IDS = {"bos": BOS_ID, "eos": EOS_ID, "base_size": BASE_VOCAB_SIZE, "vision_start": VISION_START_ID,
               "vision_patch": VISION_START_ID + 1, "vision_row_sep": VISION_START_ID + 2,
               "vision_end": VISION_START_ID + 4, "loc_first": LOC_FIRST_ID, "im_start": IM_START_ID,
               "im_end": IM_END_ID}


class SoloProcessor:
    """Tokenizer plus SOLO's image rules. The tokenizer is the export's: SentencePiece ``tokenizer.model``
    (SOLO-7B, Mistral's ids) or a ``tokenizer.json`` (Llama-3, Qwen bases; ids from ``vocab``, the
    export's ``solo_vocab``). ``AutoProcessor.from_pretrained(export, trust_remote_code=True)`` returns it."""

    def __init__(self, tokenizer_model: str, vocab: dict | None = None, row_separator: bool = True,
                 return_patch_coords: bool = False, chat_template_name: str = "chatml"):
        if not os.path.isfile(tokenizer_model):
            raise FileNotFoundError(f"tokenizer model not found: {tokenizer_model}")
        self.tokenizer_model = tokenizer_model
        self.vocab = dict(MISTRAL_IDS if vocab is None else vocab)
        self.row_separator = bool(row_separator)  # the image layout of the model's training data
        self.return_patch_coords = bool(return_patch_coords)  # the default of each call
        if chat_template_name not in CHAT_TEMPLATES:
            raise ValueError(f"chat template must be one of {CHAT_TEMPLATES}, got {chat_template_name!r}")
        self.chat_template_name = chat_template_name  # the model's (chat()'s default)
        self.chat_template = JINJA_TEMPLATES.get(chat_template_name, CHATML_TEMPLATE)
        self.kind = "hf" if tokenizer_model.endswith(".json") else "sentencepiece"
        if self.kind == "hf":
            from tokenizers import Tokenizer

            self.tk = Tokenizer.from_file(tokenizer_model)
            self.tk.encode_special_tokens = True  # a special token typed in text stays text
            piece_id = self.tk.token_to_id
        else:
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
            piece_id = self.sp.piece_to_id
            self._text = {True: _text_only_processor(tokenizer_model, True),
                          False: _text_only_processor(tokenizer_model, False)}
            self._space_id = self.sp.piece_to_id("\u2581")
        self.ids = {p: piece_id(p) for p in (VISION_START, VISION_PATCH, VISION_ROW_SEP, VISION_END, IM_START, IM_END)}
        v = self.vocab
        if self.ids[VISION_START] != v["vision_start"] or self.ids[IM_END] != v["im_end"]:
            raise ValueError(f"{tokenizer_model} is not a SOLO tokenizer (no <vision>={v['vision_start']} ... "
                             f"<|im_end|>={v['im_end']})")

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """What AutoProcessor calls on remote code: nothing to register (processor_config.json's auto_map
        already names this class, and save_pretrained writes it again)."""

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "SoloProcessor":
        """The processor of an export (or of a ``save_pretrained`` directory). ``kwargs`` (what
        ``AutoProcessor`` passes: ``trust_remote_code``, ...) are accepted and unused."""
        vocab, row_separator, coords, template = None, True, False, "chatml"
        for name in ("config.json", PROCESSOR_CONFIG):  # the processor's own config wins
            f = os.path.join(path, name)
            if os.path.isfile(f):
                with open(f) as fh:
                    cfg = json.load(fh)
                vocab = cfg.get("solo_vocab", vocab)
                row_separator = cfg.get("vision_row_separator", row_separator)
                if "image_positions" in cfg:  # a model with 2D positions needs each patch's (row, col)
                    coords = cfg["image_positions"] != "1d"
                coords = cfg.get("return_patch_coords", coords)
                template = cfg.get("chat_template_name", template)
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return cls(os.path.join(path, name), vocab, row_separator, coords, template)
        raise FileNotFoundError(f"{path} holds no tokenizer.model or tokenizer.json")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Everything ``from_pretrained``/``AutoProcessor`` need to load it again: the tokenizer files,
        ``processor_config.json`` (its ``auto_map`` and SOLO's ids) and this file."""
        import shutil

        os.makedirs(save_directory, exist_ok=True)
        src_dir = os.path.dirname(os.path.abspath(self.tokenizer_model))
        names = [os.path.basename(self.tokenizer_model)] + (["tokenizer_config.json"] if self.kind == "hf" else [])
        for name in names:
            if os.path.isfile(os.path.join(src_dir, name)):
                dst = os.path.join(save_directory, name)
                if os.path.abspath(dst) != os.path.abspath(os.path.join(src_dir, name)):
                    shutil.copyfile(os.path.join(src_dir, name), dst)
        with open(os.path.join(save_directory, PROCESSOR_CONFIG), "w") as f:
            json.dump(processor_config(None if self.vocab == MISTRAL_IDS else self.vocab, self.row_separator,
                                       self.return_patch_coords, self.chat_template_name), f, indent=2)
        here = os.path.abspath(__file__)
        if os.path.abspath(os.path.join(save_directory, "processing_solo.py")) != here:
            shutil.copyfile(here, os.path.join(save_directory, "processing_solo.py"))

    def image_token_ids(self, rows: int, cols: int) -> list[int]:
        ids = [self.ids[VISION_START]]
        for r in range(rows):
            if r and self.row_separator:
                ids.append(self.ids[VISION_ROW_SEP])
            ids.extend([self.ids[VISION_PATCH]] * cols)
        ids.append(self.ids[VISION_END])
        return ids

    def encode_text(self, text: str, after_control: bool = False) -> list[int]:
        """Text -> ids of text pieces only, as the training data was encoded. SentencePiece: text that
        starts a run (after BOS or an image) gets the dummy "▁" (dropped before a leading newline);
        text that follows a control id (``<|im_start|>``, ``<|im_end|>``, ``<loc_N>``) gets none.
        Byte-level BPE has no such prefix."""
        if not text:
            return []
        if self.kind == "hf":
            return self.tk.encode(text, add_special_tokens=False).ids
        ids = self._text[not after_control].encode(text)
        if not after_control and ids and ids[0] == self._space_id and text[0] == "\n":
            ids = ids[1:]
        return ids

    def encode_parts(self, parts, prefix_ids=(), after_control: bool = False):
        """Text, PIL images and ``{"type": "loc", "loc": N}`` parts, in order -> (token ids, uint8 patch
        arrays, their (row, col) arrays). Consecutive text forms one run, as in the training documents."""
        ids, patches, coords, pending = list(prefix_ids), [], [], ""
        for part in parts:
            if isinstance(part, str):
                pending += part
                continue
            ids.extend(self.encode_text(pending, after_control))
            pending = ""
            if isinstance(part, dict):
                n = part.get("loc") if part.get("type") == "loc" else None
                if not isinstance(n, int) or not 1 <= n <= NUM_LOC_TOKENS:
                    raise ValueError(f"unknown part {part!r}: parts are text, PIL images or "
                                     f"{{'type': 'loc', 'loc': 1..{NUM_LOC_TOKENS}}}")
                ids.append(self.vocab["loc_first"] + n - 1)
                after_control = True
                continue
            p, rows, cols = image_to_patches(part)
            ids.extend(self.image_token_ids(rows, cols))
            patches.append(p)
            coords.append(grid_coords(rows, cols))
            after_control = False
        ids.extend(self.encode_text(pending, after_control))
        return ids, patches, coords

    def _bos(self) -> list[int]:
        return [] if self.vocab["bos"] is None else [self.vocab["bos"]]

    def _pack(self, ids, patches, coords, return_patch_coords: bool | None = None) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([ids], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if patches:
            out["vision_patches"] = normalize_patches(np.concatenate(patches, axis=0))
            if self.return_patch_coords if return_patch_coords is None else return_patch_coords:
                out["vision_patch_coords"] = torch.from_numpy(np.concatenate(coords, axis=0))
            is_patch = input_ids == self.ids[VISION_PATCH]
            order = torch.cumsum(is_patch.reshape(-1).long(), 0).reshape(input_ids.shape) - 1
            out["vision_patch_indices"] = torch.where(is_patch, order, torch.full_like(order, -1))
        return out

    def __call__(self, parts=None, add_bos: bool = True, *, text=None, images=None, return_patch_coords=None,
                 **kwargs) -> dict[str, torch.Tensor]:
        """Pre-training format: BOS (where the base has one) then each part (text or PIL image) in order;
        batch of one. Hugging Face's form ``processor(text=..., images=...)`` (or a string first) puts the
        images, in order, where the text says ``<image>``; images that no ``<image>`` places are an error.
        ``return_patch_coords``: add ``vision_patch_coords`` (default: the processor's setting)."""
        if isinstance(parts, str) and images is None and text is None:
            parts = [parts]  # a plain string: text, whatever it spells
        elif isinstance(parts, str):
            parts, text = None, parts if text is None else parts + text
        if parts is None:
            parts = place_images(text or "", images)
        elif images is not None:
            raise ValueError("pass images inside the parts list, or as images= with text=; not both")
        ids, patches, coords = self.encode_parts(parts)
        return self._pack((self._bos() if add_bos else []) + ids, patches, coords, return_patch_coords)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, tokenize: bool = True,
                            return_dict: bool = False, template: str | None = None, return_patch_coords=None,
                            **kwargs):
        """Hugging Face's chat call: ``content`` a string, or a list of ``{"type": "text", "text": ...}``
        and ``{"type": "image", "image": <PIL image>}`` items (or this processor's parts). Returns the
        ids of :meth:`chat` (``return_dict``: all of its inputs), or with ``tokenize=False`` their text."""
        messages = [{"role": m["role"], "content": _parts_of(m["content"])} for m in conversation]
        out = self.chat(messages, add_generation_prompt=add_generation_prompt, template=template,
                        return_patch_coords=return_patch_coords)
        if return_dict:
            return out
        ids = out["input_ids"][0].tolist()
        return ids if tokenize else self.decode(ids, skip_special_tokens=False)

    def chat(self, messages, add_generation_prompt: bool = True, template: str | None = None,
             return_patch_coords: bool | None = None) -> dict[str, torch.Tensor]:
        """Chat turns -> model inputs, token for token as the training data of ``template`` (default: the
        model's, :attr:`chat_template_name`) was made.

        ``content`` is a string or a list of parts (text or PIL images). With ``add_generation_prompt``
        the assistant turn is opened for the model to complete (chatml: ``<|im_start|>assistant\n``;
        llama3: ``<|start_header_id|>assistant<|end_header_id|>\n\n``; solo-inst: nothing, the prompt
        ends with ``[/INST]``).
        """
        template = self.chat_template_name if template is None else template
        if template not in CHAT_TEMPLATES:
            raise ValueError(f"template must be one of {CHAT_TEMPLATES}, got {template!r}")
        if template == "solo-inst":
            if self.kind == "hf":
                raise ValueError("solo-inst is SOLO-7B's (Mistral's) format; this base's template is chatml")
            return self._pack(*self._solo_inst(messages), return_patch_coords)
        if template == "llama3":
            return self._pack(*self._llama3(messages, add_generation_prompt), return_patch_coords)
        im_start, im_end = self.vocab["im_start"], self.vocab["im_end"]
        ids, patches, coords = self._bos(), [], []
        for m in messages:
            content = m["content"] if isinstance(m["content"], list) else [m["content"]]
            turn_ids, turn_patches, turn_coords = self.encode_parts([f"{m['role']}\n", *content],
                                                                    prefix_ids=[im_start], after_control=True)
            ids.extend(turn_ids + [im_end] + self.encode_text("\n", after_control=True))
            patches.extend(turn_patches)
            coords.extend(turn_coords)
        if add_generation_prompt:
            ids.extend([im_start] + self.encode_text("assistant\n", after_control=True))
        return self._pack(ids, patches, coords, return_patch_coords)

    def _llama3(self, messages, add_generation_prompt: bool):
        """Llama-3's turns (:data:`LLAMA3_TEMPLATE`) over the base's own header and eot tokens; a message's
        content is stripped at both ends (the template's ``| trim``), its images in place."""
        sh, eh, eot = (self.vocab.get(k) for k in ("start_header", "end_header", "eot"))
        if None in (sh, eh, eot):
            raise ValueError("llama3 is Llama-3's template: this model's base has no <|start_header_id|>, "
                             "<|end_header_id|>, <|eot_id|> (use chatml)")
        ids, patches, coords = self._bos(), [], []
        for m in messages:
            content = m["content"] if isinstance(m["content"], list) else [m["content"]]
            turn_ids, turn_patches, turn_coords = self.encode_parts(["\n\n", *_trimmed(content)],
                                                                    after_control=True)
            ids.extend([sh] + self.encode_text(m["role"], after_control=True) + [eh] + turn_ids + [eot])
            patches.extend(turn_patches)
            coords.extend(turn_coords)
        if add_generation_prompt:
            ids.extend([sh] + self.encode_text("assistant", after_control=True) + [eh]
                       + self.encode_text("\n\n", after_control=True))
        return ids, patches, coords

    def _solo_inst(self, messages):
        """SOLO's released instruction format (see the module docstring). An image's adjacent newline
        (the one after it, else the one before it) is removed; a system message's text opens the first
        user turn, followed by a blank line."""
        blocks, patches, coords, turns, system = [], [], [], [], []
        for m in messages:
            parts = list(m["content"]) if isinstance(m["content"], list) else [m["content"]]
            texts = []
            for i, part in enumerate(parts):
                if isinstance(part, str):
                    texts.append(part)
                    continue
                if isinstance(part, dict) or m["role"] != "user":
                    raise ValueError("solo-inst takes text in every turn and images in user turns only")
                p, rows, cols = image_to_patches(part)
                blocks.extend(self.image_token_ids(rows, cols)[:-1] + [VISION_START_ID])
                patches.append(p)
                coords.append(grid_coords(rows, cols))
                if i + 1 < len(parts) and isinstance(parts[i + 1], str) and parts[i + 1].startswith("\n"):
                    parts[i + 1] = parts[i + 1][1:]
                elif texts and texts[-1].endswith("\n"):
                    texts[-1] = texts[-1][:-1]
            if m["role"] == "system":
                system.append("".join(texts))
            else:
                turns.append((m["role"], "".join(texts)))
        if system:
            k = next(k for k, (r, _) in enumerate(turns) if r == "user")
            turns[k] = ("user", "\n\n".join(system) + "\n\n" + turns[k][1])
        ids = blocks + [BOS_ID]
        for role, text in turns:
            if role == "user":
                ids.extend(self._text[True].encode(f"[INST] {text.strip()} [/INST]"))
            else:
                ids.extend(self._text[True].encode(text) + [EOS_ID])
        return ids, patches, coords

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            if skip_special_tokens:
                ids = [i for i in ids if i < self.vocab["base_size"]]
            return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if i < BASE_VOCAB_SIZE and i not in (UNK_ID, BOS_ID, EOS_ID)]
        return self.sp.decode(ids)


def _trimmed(parts: list) -> list:
    """Parts with the text stripped at both ends of the whole (Jinja's ``trim`` of the content): the
    whitespace of text parts before the first and after the last image or character."""
    parts = list(parts)
    for order in (range(len(parts)), range(len(parts) - 1, -1, -1)):
        for i in order:
            if not isinstance(parts[i], str):
                break
            parts[i] = parts[i].lstrip() if order.step == 1 else parts[i].rstrip()
            if parts[i]:
                break
    return parts


def _parts_of(content) -> list:
    """A message's content as parts: a string; this processor's parts; Hugging Face's typed items."""
    if isinstance(content, str):
        return [content]
    parts = []
    for item in content:
        if isinstance(item, dict) and item.get("type") == "text":
            parts.append(item["text"])
        elif isinstance(item, dict) and item.get("type") == "image":
            image = item.get("image", item.get("url", item.get("path")))
            parts.append(load_image(image) if isinstance(image, str) else image)
        else:
            parts.append(item)
    return parts


def place_images(text: str, images) -> list:
    """``text`` with each ``<image>`` replaced by the next of ``images`` (a PIL image or a list), as parts.
    Images and placeholders must pair up: an image nothing places is an error, never dropped."""
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"{len(images)} image(s) but {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) in the "
                         f"text: put one {IMAGE_PLACEHOLDER} where each image goes")
    parts = [pieces[0]]
    for image, piece in zip(images, pieces[1:]):
        parts += [image, piece]
    return [p for p in parts if not (isinstance(p, str) and not p)]


def processor_config(vocab: dict | None, row_separator: bool = True, return_patch_coords: bool = False,
                     chat_template_name: str = "chatml") -> dict:
    """``processor_config.json``: what makes ``AutoProcessor`` return :class:`SoloProcessor`, SOLO's ids of
    another base, the image layout when it is not SOLO's, whether calls return ``vision_patch_coords``,
    and the chat template the model was tuned with when it is not chatml."""
    cfg = {"processor_class": "SoloProcessor", "auto_map": {"AutoProcessor": "processing_solo.SoloProcessor"}}
    if vocab is not None:
        cfg["solo_vocab"] = vocab
    if not row_separator:
        cfg["vision_row_separator"] = False
    if return_patch_coords:
        cfg["return_patch_coords"] = True
    if chat_template_name != "chatml":
        cfg["chat_template_name"] = chat_template_name
    return cfg


__all__ = ["SoloProcessor", "LLAMA3_TEMPLATE", "place_images", "processor_config", "load_image", "to_rgb", "target_size", "image_to_patches", "normalize_patches"]
