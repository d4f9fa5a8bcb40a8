"""The demo page and its assets (``host/web/``), served by the worker and the router.

Files are read once at start-up (off the event loop) and served from memory:
``GET /`` is ``index.html`` and ``GET /web/<name>`` any other file there.
"""

from __future__ import annotations

from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent / "web"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}


def load_static(directory: Path = WEB_DIR) -> dict[str, tuple[str, bytes]]:
    """URL path → (content type, body) for every servable file in ``directory``."""
    files: dict[str, tuple[str, bytes]] = {}
    if not directory.is_dir():
        return files
    for path in sorted(directory.iterdir()):
        kind = CONTENT_TYPES.get(path.suffix)
        if kind is None or not path.is_file():
            continue
        body = path.read_bytes()
        files[f"/web/{path.name}"] = (kind, body)
        if path.name == "index.html":
            files["/"] = (kind, body)
    return files
