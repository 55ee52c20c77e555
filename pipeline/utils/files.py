"""Files rewritten in place, atomically: a kill or a full disk mid-write leaves the old file whole.

The new content goes to a temporary file beside the target, is flushed to disk, and replaces the
target in one ``os.replace`` (atomic on POSIX filesystems, NFS included, within one directory).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text``; on any failure the old content stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj, indent: int | None = 2) -> None:
    """``obj`` as JSON into ``path``, atomically (``write_text``)."""
    write_text(path, json.dumps(obj, indent=indent))
