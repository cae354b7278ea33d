"""Where an interleaved document's image is: bytes in the row, a local path, or a URL with a local copy.

Web corpora name their images by URL; nothing is fetched at run time. A URL is read only through
``--image-url-map FILE`` (what an image downloader writes: JSON lines ``{"url": ..., "path": ...}``
or ``url<TAB>path`` lines), and a URL without a local copy is dropped as ``image_not_local``. Paths
(given, or from the map) are read under ``--image-root`` like every other image path
(:func:`megatron_solo.data.encode.read_image_source`).
"""

from __future__ import annotations

import json
from typing import Mapping, Optional

from megatron_solo.data.errors import SkipRecord
from megatron_solo.errors import InputError

PATH_KEYS = ("path", "file", "local_path", "filepath")  # the local-file key of a JSONL map entry


class UrlMapError(InputError, ValueError):
    """An ``--image-url-map`` that cannot be read (a user mistake: one ``error:`` line, exit 2)."""


def load_url_map(path: str) -> dict[str, str]:
    """``--image-url-map``: URL -> local file, from JSON lines (``url`` and one of :data:`PATH_KEYS`) or
    TSV (``url<TAB>path``; a first line ``url<TAB>path`` is a header). Blank lines are ignored."""
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if line.startswith("{"):
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UrlMapError(f"--image-url-map {path}:{lineno}: not valid JSON ({e})") from None
                    url, local = obj.get("url"), next((obj[k] for k in PATH_KEYS if obj.get(k)), None)
                else:
                    url, _, local = line.partition("\t")
                    if lineno == 1 and (url, local) == ("url", "path"):
                        continue
                if not isinstance(url, str) or not url or not isinstance(local, str) or not local:
                    raise UrlMapError(f"--image-url-map {path}:{lineno}: needs a url and a local path "
                                      f"(JSON keys url + one of {', '.join(PATH_KEYS)}, or url<TAB>path)")
                out[url] = local
    except OSError as e:
        raise UrlMapError(f"--image-url-map {path}: {e.strerror or e}") from None
    return out


def is_remote(src: str) -> bool:
    """A URL that names a file elsewhere (not a data URL, not ``file://``)."""
    return "://" in src and not src.startswith(("file://", "data:"))


def resolve_image(cell, url_map: Optional[Mapping[str, str]], where: str):
    """An image cell -> what :func:`~megatron_solo.data.encode.read_image_source` reads (bytes or a path /
    data URL). A cell is bytes, a Hugging Face image struct ``{bytes, path}`` (bytes first), or a string
    (a path, a data URL, or a URL looked up in ``url_map``). Raises :class:`SkipRecord`:
    ``image_not_local`` for a URL without a local copy."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)) and cell:
        return bytes(cell)
    if not isinstance(cell, str) or not cell:
        raise SkipRecord("bad_row", f"{where}: an image cell of type {type(cell).__name__} without bytes or path")
    if url_map and cell in url_map:
        return url_map[cell]
    if is_remote(cell):
        raise SkipRecord("image_not_local", f"{where}: {cell[:120]} (not in --image-url-map)")
    return cell
