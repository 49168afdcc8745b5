"""The page, its script and its style sheet: a fixed table of files, built once."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import attrs
import trio

__all__ = ["CONTENT_TYPES", "StaticFile", "StaticFiles"]

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

#: What ``/`` and ``/d/<name>`` answer: the page opens the document named in its URL.
PAGE = "/static/index.html"


@attrs.frozen
class StaticFile:
    content: bytes
    content_type: str


@attrs.frozen
class StaticFiles:
    """``/static/<file>`` for each servable file directly in a folder, plus the page at
    ``/`` and ``/d/<name>``. The table is built once, so no request path can reach any
    other file (``..``, ``%2F`` and the like simply miss)."""

    routes: dict[str, Path]

    @classmethod
    def from_dir(cls, folder: Path) -> StaticFiles:
        routes: dict[str, Path] = {}
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                if (
                    entry.is_file()
                    and not entry.name.startswith(".")
                    and entry.suffix in CONTENT_TYPES
                ):
                    routes[f"/static/{urllib.parse.quote(entry.name)}"] = entry
        return cls(routes)

    def lookup(self, path: str) -> Path | None:
        """The file for a request *path* (query removed), or ``None``."""
        if path == "/" or (path.startswith("/d/") and len(path) > len("/d/")):
            path = PAGE
        return self.routes.get(path)

    async def read(self, path: str) -> StaticFile | None:
        """The file for a request *path*, read now (edits show without a restart), or
        ``None`` if there is none or it cannot be read."""
        file = self.lookup(path)
        if file is None:
            return None
        try:
            content = await trio.Path(file).read_bytes()
        except OSError:
            return None
        return StaticFile(content, CONTENT_TYPES.get(file.suffix, "application/octet-stream"))
