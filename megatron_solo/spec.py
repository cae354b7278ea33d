"""SOLO's fixed facts, in one place (``../shared/SOLO_SPEC.md``): token ids and pieces, vocabulary sizes
and Megatron's padding rule, patch geometry, the image size limit, ImageNet statistics, role codes, and
the one pixel normalisation.

Every module of the package takes these from here. The files exported into a Hugging Face checkpoint
(``convert/hf_files/*.py``) keep their own copies on purpose (an export is self-contained);
``tests/test_spec.py`` proves they agree. Light on purpose: no megatron, numpy or torch at import.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class SoloTokenIds:
    """The fixed ids of SOLO_SPEC: piece ``SOLO_SPECIAL_PIECES[k]`` has id ``BASE_VOCAB_SIZE + k``."""

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


SOLO_IDS = SoloTokenIds()

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
