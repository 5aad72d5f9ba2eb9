"""File names inside STAR files, resolved the way RELION does, with fallbacks for moved files.

RELION writes paths relative to the project directory, which is the working directory of
every job. Files exported by other programs (WarpTools) or copied out of their project name
files relative to the STAR file instead, so we also look there.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["relative_to_cwd", "resolve_path", "strip_image_name"]


def strip_image_name(name: str) -> str:
    """``"3@stack.mrcs"`` -> ``"stack.mrcs"``, ``"ts.mrc:mrc"`` -> ``"ts.mrc"`` (RELION forms)."""
    text = str(name).strip()
    if "@" in text and text.split("@", 1)[0].isdigit():
        text = text.split("@", 1)[1]
    for suffix in (":mrcs", ":mrc"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    return text


def resolve_path(name: str | os.PathLike, star_file: str | os.PathLike | None) -> Path:
    """The file that ``name`` (as written in ``star_file``) refers to.

    Tried in order: absolute paths as they are; relative to the working directory (RELION's
    project directory); relative to the STAR file's folder and each of its parents; the bare
    file name in the STAR file's folder. The first that exists wins; if none exists the
    working-directory path is returned, so that an error names what RELION would look for.
    """
    path = Path(strip_image_name(str(name)))
    if path.is_absolute() or path.exists() or star_file is None:
        return path
    folder = Path(star_file).parent
    candidates = [folder / path, *(parent / path for parent in folder.parents)]
    candidates.append(folder / path.name)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return path


def relative_to_cwd(path: str | os.PathLike) -> str:
    """``path`` as RELION writes it: relative to the working directory when inside it."""
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(absolute)
