"""The playground: one static page at `/` (HTML, JS and CSS shipped in ember/server/playground as package data,
no build step, nothing fetched from elsewhere) to chat with the served model through this server's own OpenAI
routes. The files hold no secrets, so they are served without the API key; the page's API calls carry it."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

PLAYGROUND_DIR = Path(__file__).parent / "playground"
# URL path -> (file, media type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
PLAYGROUND_PATHS = frozenset(FILES)


def _handler(body: bytes, media_type: str):
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return serve


def add_playground_routes(app: FastAPI) -> None:
    for path, (name, media_type) in FILES.items():  # read once: the files do not change while serving
        app.add_api_route(path, _handler((PLAYGROUND_DIR / name).read_bytes(), media_type), methods=["GET"],
                          include_in_schema=False)
