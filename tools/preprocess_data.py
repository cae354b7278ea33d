#!/usr/bin/env python
"""Turn image-text corpora into SOLO indexed datasets: P-tokens, P-roles and the images, as
P-images + P-imageidx (``--image-storage encoded``, the default) or P-patches (``patches``).

    .venv/bin/python tools/preprocess_data.py --input data/*.jsonl.zst --output-prefix out/cc3m \
        --tokenizer-model tok/tokenizer.model --format pretrain --seq-length 32768 --workers 8

See docs/DATA_FORMAT.md for the inputs, the layout on disk and the skip reasons.
"""

import argparse
import json
import logging
import sys

from megatron_solo import quiet
from megatron_solo.data.allocator import keep_freed_memory
from megatron_solo.data.chat_templates import CHAT_TEMPLATES
from megatron_solo.data.encode import FORMATS
from megatron_solo.data.image import DEFAULT_MAX_IMAGE_PIXELS
from megatron_solo.data.image_sources import load_url_map
from megatron_solo.data.image_storage import IMAGE_STORAGES
from megatron_solo.data.interleaved import InterleavedOptions
from megatron_solo.data.parquet_input import LAYOUTS, ParquetColumns
from megatron_solo.data.preprocess import PreprocessConfig, preprocess
from megatron_solo.data.worker_pool import WorkerDied
from megatron_solo.errors import entry_point, print_error


@entry_point  # too many skips (exit 1), a missing --input, a bad --tokenizer-model or Parquet layout (exit 2)
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="chat/LLaVA .jsonl/.json or WebDataset .tar files (optionally .gz/.lz4/.zst), "
                        "or Hugging Face .parquet files")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-model", required=True, help="SOLO's tokenizer.model or tokenizer.json (tools/create_solo_tokenizer.py)")
    p.add_argument("--format", choices=FORMATS, default="pretrain",
                   help="pretrain: BOS + parts, no template (SOLO's pre-training); chat: turns in --chat-template")
    p.add_argument("--chat-template", choices=CHAT_TEMPLATES, default="chatml",
                   help="with --format chat: chatml (<|im_start|>role ... <|im_end|>; the default) or solo-inst "
                        "(SOLO-7B's released [INST] ... [/INST] instruction format); docs/DATA_FORMAT.md")
    p.add_argument("--allow-image-placeholder-mismatch", action="store_true",
                   help="LLaVA records: let a single image fill every '<image>' and stand in gpt turns "
                        "(default: such records are skipped as image_placeholder_mismatch / image_in_assistant_turn)")
    p.add_argument("--seq-length", type=int, default=None, help="pack greedily into sequences of this length")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--image-root", default=None,
                   help="directory relative image paths are read from (default: the current working directory)")
    p.add_argument("--no-exif-transpose", action="store_true", help="ignore EXIF orientation, as SOLO did")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="skip images with more pixels (decompression bombs); default PIL's limit")
    p.add_argument("--max-error-rate", type=float, default=0.01,
                   help="fail (exit 1, no prefix written) when more than this fraction of records is skipped")
    p.add_argument("--overwrite", action="store_true", help="rebuild a prefix that is already complete")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--image-storage", choices=IMAGE_STORAGES, default="encoded",
                   help="encoded: keep each image's encoded bytes, patches made while training (DataLoader "
                        "workers, --num-workers); patches: uint8 patches, 3072 bytes each (docs/DATA_FORMAT.md)")
    p.add_argument("--row-separator", choices=("on", "off"), default="on",
                   help="on: a <vrow_sep> between rows of an image's patches (SOLO); off: the patches row-major "
                        "with no separator (SAIL's layout; needs --image-storage encoded). Recorded in P.stats.json; "
                        "a training blend takes one layout")
    p.add_argument("--parquet-layout", choices=LAYOUTS, default="auto",
                   help=".parquet inputs: llava (conversations + image), chat (messages + images), caption "
                        "(image + text), interleaved (texts + images, OBELICS-style web documents); auto detects "
                        "from the columns")
    p.add_argument("--image-column", default=None, help=".parquet: the image column (default image/images; interleaved: images)")
    p.add_argument("--text-column", default=None, help=".parquet caption layout: the text column; interleaved: the texts column")
    p.add_argument("--messages-column", default=None, help=".parquet: the conversations/messages column")
    p.add_argument("--min-image-similarity", type=float, default=None,
                   help="MMC4-style documents: leave out images whose matched_sim is below this (counted as "
                        "below_min_similarity)")
    p.add_argument("--image-url-map", default=None,
                   help="interleaved documents: a JSONL ({url, path}) or TSV (url<TAB>path) file from image URL to "
                        "local file; a URL not in it is left out as image_not_local (nothing is downloaded)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="write PREFIX_00000, PREFIX_00001, ... of this many input records each, then PREFIX.shards; "
                        "a rerun skips complete shards (resume after a crash); --data-path takes PREFIX.shards")
    p.add_argument("--python-writer", action="store_true", help="use megatron-core's Python builder (slower)")
    a = p.parse_args(argv)
    quiet.filter_known_warnings()  # megatron-core's import-time notes that ask nothing of the user
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # this process decodes and writes images in a loop (megatron_solo/data/allocator.py)
    if a.seq_length is not None and a.seq_length < 1:
        p.error("--seq-length must be positive")
    if a.shard_size is not None and a.shard_size < 1:
        p.error("--shard-size must be positive")
    cfg = PreprocessConfig(
        inputs=a.input, output_prefix=a.output_prefix, tokenizer_model=a.tokenizer_model, fmt=a.format,
        seq_length=a.seq_length, workers=max(1, a.workers), image_root=a.image_root,
        exif_transpose=not a.no_exif_transpose, max_image_pixels=a.max_image_pixels,
        max_error_rate=a.max_error_rate, overwrite=a.overwrite, progress=not a.no_progress,
        use_cpp=not a.python_writer, chat_template=a.chat_template,
        allow_image_mismatch=a.allow_image_placeholder_mismatch, image_storage=a.image_storage,
        shard_size=a.shard_size, row_separator=a.row_separator == "on",
        interleaved=InterleavedOptions(a.min_image_similarity, load_url_map(a.image_url_map) if a.image_url_map
                                       else None),
        parquet=ParquetColumns(a.parquet_layout, a.image_column, a.text_column, a.messages_column))
    try:
        stats = preprocess(cfg)
    except WorkerDied as e:  # the pool's error, said as this tool's outcome
        print_error(f"{e}; no prefix written" + (" (complete shards are kept; rerun to resume)" if a.shard_size
                                                 else ""))
        return 1
    except KeyboardInterrupt:
        print("interrupted: no prefix written" + (" (complete shards are kept; rerun to resume)" if a.shard_size
                                                  else ""), file=sys.stderr)
        return 130
    if stats.get("skipped_existing"):
        print(f"{a.output_prefix} is complete; nothing to do (--overwrite to rebuild)")
        return 0
    summary = {k: stats.get(k) for k in ("records", "documents", "packs", "tokens", "image_tokens", "images",
                                     "patches", "skipped_total", "time_s", "image_storage", "row_separator",
                                     "bytes_per_image", "bytes_per_token", "images_dropped_total",
                                     "documents_all_images_dropped")}
    if a.shard_size:
        summary.update(shards=len(stats["shards"]), shards_skipped=stats["shards_skipped"],
                       data_path=a.output_prefix + ".shards")
    print(json.dumps({"output_prefix": a.output_prefix, **summary, "skipped": stats["skipped"],
                      "images_dropped": stats.get("images_dropped", {})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
