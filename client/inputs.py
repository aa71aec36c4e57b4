"""What to upscale and where each result goes: INPUT arguments → a lazy stream of jobs.

    naming = Naming(out_dir=None, output_format=None)
    for item in expand(["photos/", "a.png", "-"], naming, stdin=sys.stdin):
        ...  # a Job, or an Unusable (a named path that is not there)

Nothing is listed ahead: folders are walked with :func:`os.scandir` as the stream is
consumed and stdin is read a line at a time, so a million inputs cost no more memory
than ten (a walk holds only the folders still to visit).

Naming (:class:`Naming`): ``photo.png`` → ``photo.2x.png`` beside it, or in ``--out``.
Files named on the command line or on stdin go straight into ``--out`` by name; a
folder's files keep their path below that folder (``photos/a/b.png`` →
``OUT/a/b.2x.png``), so two files of the same name in different subfolders never
meet. The output format is ``--format``, else the input's own when it is PNG, JPG or
WEBP, else PNG (lossless).

A folder walk takes every file whose extension Pillow opens, except hidden files and
folders (names starting with ``.``, which include this tool's ``.part`` temp files),
earlier outputs (``*.2x.*``) and the ``--out`` folder itself: a rerun over the same
folder never upscales its own results.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TextIO

__all__ = ["FORMATS", "MARK", "Job", "Naming", "Unusable", "expand", "image_extensions"]

MARK = ".2x"  # inserted before an output's extension
# --format value → the protocol's outputFormat
FORMATS = {"png": "PNG", "jpg": "JPG", "jpeg": "JPG", "webp": "WEBP"}
_FORMAT_OF_SUFFIX = {".png": "PNG", ".jpg": "JPG", ".jpeg": "JPG", ".webp": "WEBP"}
_SUFFIX_OF_FORMAT = {"PNG": ".png", "JPG": ".jpg", "WEBP": ".webp"}


@dataclass(frozen=True, slots=True)
class Job:
    """One input image and the file its result goes to."""

    source: Path
    output: Path
    output_format: str  # PNG, JPG or WEBP


@dataclass(frozen=True, slots=True)
class Unusable:
    """A named input that cannot be sent (reported as a failure, not sent)."""

    source: Path
    code: str
    message: str


@cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (``.png``) of the formats this Pillow can open."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def output_name(name: str, output_format: str) -> str:
    """``photo.png`` → ``photo.2x.png``; the input's extension is kept when it names the
    output's format (``.jpeg`` stays ``.jpeg``), else the format's own is used."""
    stem, suffix = os.path.splitext(name)
    if _FORMAT_OF_SUFFIX.get(suffix.lower()) != output_format:
        suffix = _SUFFIX_OF_FORMAT[output_format]
    return f"{stem}{MARK}{suffix}"


def is_output_name(name: str) -> bool:
    """Whether ``name`` looks like an output of this tool (``*.2x.ext``)."""
    return os.path.splitext(name)[0].endswith(MARK)


@dataclass(frozen=True)
class Naming:
    """Where each input's output goes: see the module docstring."""

    out_dir: Path | None = None
    output_format: str | None = None  # PNG, JPG, WEBP; None: the input's own (PNG for others)

    def format_for(self, source: Path) -> str:
        return self.output_format or _FORMAT_OF_SUFFIX.get(source.suffix.lower(), "PNG")

    def job(self, source: Path, root: Path | None = None) -> Job:
        """The job for ``source``; ``root`` is the folder argument it was found under."""
        fmt = self.format_for(source)
        name = output_name(source.name, fmt)
        if self.out_dir is None:
            output = source.with_name(name)
        elif root is None:
            output = self.out_dir / name
        else:
            output = self.out_dir / source.parent.relative_to(root) / name
        return Job(source, output, fmt)


def expand(inputs: Iterable[str], naming: Naming, stdin: TextIO | None = None) -> Iterator[Job | Unusable]:
    """Every job of ``inputs`` (files, folders, ``-`` for paths on ``stdin``), lazily."""
    for arg in inputs:
        if arg == "-":
            if stdin is None:
                raise ValueError("'-' reads paths from stdin, but there is none")
            for line in stdin:
                path = line.rstrip("\r\n")
                if path.strip():
                    yield from _expand_path(Path(path), naming)
        else:
            yield from _expand_path(Path(arg), naming)


def _expand_path(path: Path, naming: Naming) -> Iterator[Job | Unusable]:
    if path.is_dir():
        yield from _walk(path, naming)
    elif path.is_file():
        yield naming.job(path)
    elif path.exists():
        yield Unusable(path, "invalidInput", "not a regular file or a folder")
    else:
        yield Unusable(path, "missingFile", "no such file or folder")


def _walk(root: Path, naming: Naming) -> Iterator[Job | Unusable]:
    """Depth-first over ``root``, in the order the file system lists entries (no sort: a
    sorted listing would hold a whole folder's names). Symlinked files are followed,
    symlinked folders are not (no loops)."""
    extensions = image_extensions()
    skip = _resolved(naming.out_dir)
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = os.scandir(folder)
        except OSError as exc:
            yield Unusable(folder, "readFailed", f"cannot list the folder: {exc.strerror or exc}")
            continue
        subfolders = []
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subfolders.append(Path(entry.path))
                        continue
                    if not entry.is_file():
                        continue
                except OSError:
                    continue
                name = entry.name
                if os.path.splitext(name)[1].lower() in extensions and not is_output_name(name):
                    yield naming.job(Path(entry.path), root)
        pending.extend(f for f in reversed(subfolders) if skip is None or _resolved(f) != skip)


def _resolved(path: Path | None) -> Path | None:
    if path is None:
        return None
    try:
        return path.resolve()
    except OSError:
        return path.absolute()
