"""The web playground: a page that talks to the gateway exactly as a frontend would.

The page (``static/``: HTML, CSS and plain ES modules, no build step, nothing fetched
from elsewhere) is shipped as package data and read once, by :func:`load`, when the
route table is built. :mod:`gateway.routes` serves it at ``GET /playground`` and its
files at ``GET /playground/{name}``, each with :data:`SECURITY_HEADERS`.

The page speaks the WebSocket protocol (authentication, ping, upscale tasks with
``includeProgress``, session resume) and polls ``GET /stats`` for its live panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

__all__ = ["SECURITY_HEADERS", "StaticFile", "load"]

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# Nothing inline and nothing from elsewhere: scripts and styles are the page's own files;
# images are the server's outputs (same origin), the user's own files (blob:) and data: URIs;
# the only connections are the WebSocket and GET /stats.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self' ws: wss:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str


def load() -> dict[str, StaticFile]:
    """The page's files by name (``index.html``, ``app.js``, …), read from package data."""
    files: dict[str, StaticFile] = {}
    for entry in resources.files(__name__).joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in MEDIA_TYPES:
            files[entry.name] = StaticFile(entry.read_bytes(), MEDIA_TYPES[suffix])
    if "index.html" not in files:
        raise RuntimeError("the playground's index.html is missing from the package (see pyproject.toml)")
    return files
