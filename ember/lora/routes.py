"""Run-time adapter loading over HTTP (vLLM's routes): `POST /v1/load_lora_adapter {lora_name, lora_path}` and
`POST /v1/unload_lora_adapter {lora_name}`.

Off unless `ember.lora_runtime_dir` is set, and then confined to it: `lora_path` must resolve (symlinks
followed) to a directory inside that root, so a request can never point the server at other files. The routes
sit behind the API key like every route but /health. Reading and validating an adapter happens in the engine core
(a control message between two steps); the core then uses it from its next step.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ember.errors import InvalidRequestError, ModelNotFoundError

_NAME = re.compile(r"^[a-zA-Z0-9_\-.:]{1,128}$")  # as build.lora_adapters names


def confined_adapter_dir(root: str, lora_path: str) -> Path:
    """`lora_path` (relative to `root`, or absolute) resolved, refused unless it is a directory inside `root`."""
    base = Path(root).expanduser().resolve()
    path = (base / lora_path).resolve()
    if not path.is_relative_to(base) or path == base:
        raise InvalidRequestError(f"lora_path {lora_path!r} is outside the adapter directory {base}", param="lora_path")
    if not path.is_dir():
        raise InvalidRequestError(f"lora_path {lora_path!r} is not an adapter directory", param="lora_path")
    return path


async def _body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidRequestError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    name = body.get("lora_name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError("lora_name must be 1-128 letters, digits, '_', '-', '.' or ':'", param="lora_name")
    return body


def add_lora_routes(app: FastAPI, state, cfg, guard) -> None:
    """Adds the two routes when `cfg.ember.lora_runtime_dir` is set; `guard` is the app's error mapper."""
    root = getattr(getattr(cfg, "ember", None), "lora_runtime_dir", None)
    engine = state.engine
    if not root or not getattr(engine, "has_lora", False):
        return

    async def load(_state, request: Request):
        body = await _body(request)
        name, lora_path = body["lora_name"], body.get("lora_path")
        if not isinstance(lora_path, str) or not lora_path:
            raise InvalidRequestError("lora_path must be a directory inside the adapter directory", param="lora_path")
        if name == state.engine.served_model_name:
            raise InvalidRequestError(f"lora_name {name!r} is the base model's name", param="lora_name")
        path = confined_adapter_dir(root, lora_path)
        await engine.add_lora(name, path)  # read and checked in the engine core; a bad adapter is a 400
        return JSONResponse({"object": "lora_adapter", "id": name, "status": "loaded"})

    async def unload(_state, request: Request):
        name = (await _body(request))["lora_name"]
        if name not in engine.lora_names:
            raise ModelNotFoundError(f"LoRA adapter {name!r} is not loaded", param="lora_name")
        await engine.remove_lora(name)
        return JSONResponse({"object": "lora_adapter", "id": name, "status": "unloaded"})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await guard(state, load, request, needs_engine=False)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await guard(state, unload, request, needs_engine=False)
