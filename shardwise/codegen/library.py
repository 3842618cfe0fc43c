"""The runtime library every package carries: the modules of ``shardwise.runtime.lib``, copied verbatim
into the package's ``_runtime/`` directory (the program imports it as ``C``).

Codegen never imports or runs the library: it ships its source files, which it finds through the import
system by the library's module name (``importlib.util.find_spec``: the library itself is not executed, so
codegen still depends on no runtime code). The library imports torch and its own modules only
(import-layer contract "the runtime library imports nothing from shardwise outside itself").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["LIBRARY", "DIRECTORY", "library_files"]

LIBRARY = "shardwise.runtime.lib"  # the module whose files are copied
DIRECTORY = "_runtime"  # where they go in a package


def library_files() -> dict[str, str]:
    """``{"_runtime/<module>.py": source}`` for every module of the library, in name order."""
    spec = importlib.util.find_spec(LIBRARY)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the runtime library {LIBRARY} is not installed with shardwise: reinstall shardwise"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return {
        f"{DIRECTORY}/{path.name}": path.read_text(encoding="utf-8") for path in sorted(root.glob("*.py"))
    }
