"""The names and markers of what revffn-fx writes beside and into OUT_DIR: the staging,
moved-aside and lock names, and the marker file (a run's token, its process id, the files
it wrote) that says a directory is revffn-fx's."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

TMP_TAG, OLD_TAG, LOCK_TAG = ".revffn-tmp-", ".revffn-old-", ".revffn-lock"
#: in every directory revffn-fx writes (the staging directory, which becomes the export)
MARKER = ".revffn-fx"
#: written into OUT_DIR just before a swap moves it aside (it is then deleted or restored)
ASIDE = ".revffn-aside"


def write_marker(directory: Path, token: str, name: str = MARKER,
                 files: list[str] | None = None) -> None:
    """Mark ``directory`` as written by this revffn-fx run (``token``: the run's)."""
    record: dict[str, object] = {"written_by": "revffn-fx", "token": token, "pid": os.getpid()}
    if files is not None:
        record["files"] = sorted(files)
    (directory / name).write_text(json.dumps(record) + "\n")


def read_marker(directory: Path, name: str = MARKER) -> dict[str, object] | None:
    """The marker ``name`` of ``directory``, or None when absent or not revffn-fx's."""
    file = directory / name
    try:
        st = os.lstat(file)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            return None
        record = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if (not isinstance(record, dict) or record.get("written_by") != "revffn-fx"
            or not isinstance(record.get("token"), str)):
        return None
    return record
