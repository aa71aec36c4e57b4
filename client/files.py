"""Reading an input for sending and writing an output so that it is never half there.

Both run on worker threads (disk I/O never blocks the event loop). An output is written
to a hidden temporary name beside its final one (``.photo.2x.png.<pid>.<n>.part``) and
renamed into place (:func:`os.replace`, atomic on POSIX), so a file with the final name
is always complete, whatever interrupts the run; a ``.part`` file left by a killed
process is ignored by folder walks and can be deleted.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from .inputs import Job

__all__ = ["BASE64_OUTPUT_MAX_PIXELS", "MAX_INPUT_BYTES", "InputError", "Prepared", "prepare", "write_atomic"]

# The gateway's default frame limit is 32 MiB and a frame carries the image as base64
# (4/3 of its size) plus a little JSON: an input over 24 MiB could never be sent, and
# trying would only make the server close the connection.
MAX_INPUT_BYTES = 24 * 2**20 - 64 * 2**10
# Outputs up to this many pixels come back inside the result frame (base64Data); larger
# ones are fetched from their imageURL: a multi-megabyte frame would hold up every other
# result behind it on the one socket, and sit in the server's replay buffer on a drop.
BASE64_OUTPUT_MAX_PIXELS = 1024 * 1024

_part_numbers = itertools.count()


class InputError(Exception):
    """An input that cannot be sent; ``code`` names why (``missingFile``, ``inputTooLarge``, …)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Prepared:
    """A job ready to send: its image as base64 and how its output should come back."""

    job: Job
    image_base64: str
    output_type: str  # "base64Data" or "URL"


def prepare(job: Job) -> Prepared:
    """Read ``job.source`` for sending (blocking I/O, a few system calls for a small file)."""
    try:
        data = _read_file(job.source)
    except FileNotFoundError as exc:
        raise InputError("missingFile", "no such file") from exc
    except OSError as exc:
        raise InputError("readFailed", f"cannot read the file: {exc.strerror or exc}") from exc
    return Prepared(job, base64.b64encode(data).decode("ascii"), _output_type(data))


def _read_file(path: Path) -> bytes:
    """The file's bytes, in the fewest system calls (open, fstat, read, close: a plain
    ``open()`` adds an isatty ioctl and seeks, which add up over a million files)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_INPUT_BYTES:
            raise InputError(
                "inputTooLarge", f"the file is {size} bytes; at most {MAX_INPUT_BYTES} can be sent"
            )
        chunks = []
        while chunk := os.read(fd, max(size, 2**16)):
            chunks.append(chunk)
            size = 2**16  # (the file grew while being read)
            if sum(map(len, chunks)) > MAX_INPUT_BYTES:
                raise InputError("inputTooLarge", f"the file grew over {MAX_INPUT_BYTES} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``path`` (created or truncated) holding ``data``, in the fewest system calls."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _output_type(data: bytes) -> str:
    """base64Data for outputs up to BASE64_OUTPUT_MAX_PIXELS, else URL. Reads only the
    image header; an unreadable one is sent as is and the server says what is wrong."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:
        return "base64Data"
    return "base64Data" if 4 * width * height <= BASE64_OUTPUT_MAX_PIXELS else "URL"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (blocking I/O)."""
    part = path.with_name(f".{path.name}.{os.getpid()}.{next(_part_numbers)}.part")
    try:
        try:
            _write_file(part, data)
        except FileNotFoundError:  # the first output in its folder
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_file(part, data)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
