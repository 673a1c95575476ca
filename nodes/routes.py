"""The pack's HTTP route: the LLM model list the page shows in DynASyn LLM Settings (and Describe / Prompts).

Anyone who reaches ComfyUI's port can call it with any endpoint, so it applies exactly the rules of the LLM calls
(``dynasyn.llm.offered_models``: no credentials / query / metadata addresses, ``DYNASYN_ENDPOINT_HOSTS``, the key
only to hosts the operator named) and answers only model names, never the endpoint's reply.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from ..dynasyn.errors import DynASynError

log = logging.getLogger("DynASyn")

MODELS_ROUTE = "/dynasyn/llm_models"
MAX_ENDPOINT_CHARS = 2000
MAX_BODY_BYTES = 8192  # ComfyUI lets a request carry 100 MB; parsing that would stall its event loop
LIST_TIMEOUT_S = 10.0
_listing = asyncio.Semaphore(4)  # a burst of requests never ties up more than 4 of the server's worker threads


async def llm_models(request: web.Request) -> web.Response:
    """POST {"endpoint": URL} -> {"models": [names], "offered": bool}, or 400 {"error": what to do}."""
    from ..dynasyn.llm import offered_models

    raw = b""
    while len(raw) <= MAX_BODY_BYTES and (chunk := await request.content.read(MAX_BODY_BYTES + 1 - len(raw))):
        raw += chunk
    if len(raw) > MAX_BODY_BYTES:
        return web.json_response({"error": f"The request is larger than {MAX_BODY_BYTES} bytes: send only "
                                           '{"endpoint": URL}.'}, status=413)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
        body = None
    endpoint = body.get("endpoint") if isinstance(body, dict) else None
    if not isinstance(endpoint, str) or not endpoint.strip() or len(endpoint) > MAX_ENDPOINT_CHARS:
        return web.json_response({"error": 'Send {"endpoint": "http://127.0.0.1:11434/v1"}: the base URL of an '
                                           "OpenAI-compatible server."}, status=400)
    try:
        async with _listing:
            names = await asyncio.to_thread(offered_models, endpoint, LIST_TIMEOUT_S)
    except DynASynError as e:
        return web.json_response({"error": str(e)}, status=400)
    return web.json_response({"models": names or [], "offered": names is not None})


def register_routes() -> None:
    """Adds the route to ComfyUI's server (at import, before it starts); nothing without a server (tests, scripts)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return
    instance.routes.post(MODELS_ROUTE)(llm_models)
