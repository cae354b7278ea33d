"""SOLO data: tokenizer, roles/loss mask, image -> patches, document encoding, packing, indexed
datasets, training datasets and blends. See docs/DATA_FORMAT.md.

Names are imported lazily (PEP 562), so ``import megatron_solo.data.image`` (what preprocessing
workers need) does not pull in torch and megatron-core.
"""

import importlib

_EXPORTS = {
    "dataset": ("BATCH_KEYS", "SoloDataset", "SoloDatasetConfig", "build_sample", "build_train_valid_test_datasets",
                "collate", "parse_data_path"),
    "encode": ("DocumentEncoder", "EncodedDocument", "image_block_length", "image_block_tokens",
               "normalize_messages", "video_block_tokens"),
    "errors": ("SKIP_REASONS", "SkipRecord"),
    "image": ("image_to_patches", "load_image", "target_size"),
    "indexed": ("Packer", "SoloIndexedDataset", "SoloPrefixWriter", "prefix_complete"),
    "merge": ("merge_prefixes",),
    "preprocess": ("PreprocessConfig", "preprocess"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"megatron_solo.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'megatron_solo.data' has no attribute {name!r}")
