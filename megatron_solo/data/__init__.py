"""SOLO data: tokenizer, roles/loss mask, image -> patches, document encoding, packing, indexed
datasets, training datasets and blends. See docs/DATA_FORMAT.md."""

from megatron_solo.data.dataset import (  # noqa: F401
    BATCH_KEYS,
    SoloDataset,
    SoloDatasetConfig,
    build_sample,
    build_train_valid_test_datasets,
    collate,
    parse_data_path,
)
from megatron_solo.data.encode import (  # noqa: F401
    DocumentEncoder,
    EncodedDocument,
    image_block_length,
    image_block_tokens,
    normalize_messages,
    video_block_tokens,
)
from megatron_solo.data.errors import SKIP_REASONS, SkipRecord  # noqa: F401
from megatron_solo.data.image import (  # noqa: F401
    PATCH_DIM,
    PATCH_SIZE,
    image_to_patches,
    load_image,
    normalize_patches,
    target_size,
)
from megatron_solo.data.indexed import (  # noqa: F401
    Packer,
    SoloIndexedDataset,
    SoloPrefixWriter,
    prefix_complete,
)
