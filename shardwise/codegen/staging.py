"""Write a package directory all or nothing: the files go into a fresh directory beside the target, which
replaces the target only once every file is written (a failure leaves the old package as it was)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = ["staged_directory", "write_files"]


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh directory beside ``target`` to write into; on leaving without an error it becomes
    ``target`` (an existing ``target`` is moved aside first and removed only after the swap), on an error it is
    removed and ``target`` is untouched."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            target.rename(backup)
            tmp.rename(target)
            shutil.rmtree(backup)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_files(directory: Path, files: Mapping[str, str]) -> None:
    """Write each ``name: text`` under ``directory``, making sub-directories as needed."""
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
