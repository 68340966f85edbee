"""The routes the extension adds to the webui's FastAPI app (`on_app_started(demo, app)`).

- `POST /sidetrain/refresh-hypernetworks` — reloads the webui's hypernetwork list; the sidecar
  calls it after writing a hypernetwork (bridge/webui.ts `REFRESH_ROUTE`). Answers
  `{"ok": true, "hypernetworks": [names]}`, or 501 on a webui without hypernetworks. Allowed from
  the webui's own machine (where the sidecar runs), or from anywhere with the sidecar's token.
- `/sidetrain` → redirect to `/sidetrain/` (the page uses relative URLs under it).
- `/sidetrain/{path}` — every HTTP method and WebSocket, to the sidecar (proxy.py).
"""

import hmac
import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.websockets import WebSocket

from . import PREFIX
from .config import read_settings
from .proxy import Proxy, error_response, same_origin
from .webui import authorized_by_gradio, reload_hypernetworks

log = logging.getLogger("sidetrain")

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _may_refresh(request: Request, token: str) -> bool:
    """The sidecar's call: from this machine, or with `Authorization: Bearer <token>`; never from a
    browser page on another site."""
    if not same_origin(request):
        return False
    sent = request.headers.get("authorization", "")
    if token and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return True
    return request.client is not None and request.client.host in LOOPBACK


def mount(app, get_settings=read_settings, authorized=None, http_client=None) -> Proxy:
    """Add the routes to `app` (once per app: the webui calls on_app_started again after a UI reload,
    with a new app). `authorized` defaults to the webui's gradio login check."""
    if getattr(app, "_sidetrain_mounted", False):
        return app._sidetrain_mounted
    proxy = Proxy(get_settings, authorized or authorized_by_gradio(app), http_client)

    async def refresh_hypernetworks(request: Request):
        if not _may_refresh(request, get_settings().token):
            return error_response(403, "only the sidetrain sidecar may call this route")
        try:
            names = await run_in_threadpool(reload_hypernetworks)
        except LookupError as err:
            return error_response(501, str(err))
        log.info("sidetrain: reloaded the hypernetwork list (%d)", len(names))
        return JSONResponse({"ok": True, "hypernetworks": names})

    async def to_page(request: Request):
        return RedirectResponse(request.url.path + "/", status_code=307)

    async def proxy_http(request: Request, path: str):
        return await proxy.http(request, path)

    async def proxy_websocket(websocket: WebSocket, path: str):
        await proxy.websocket(websocket, path)

    # order matters: the refresh route must come before the catch-all proxy route
    before = len(app.router.routes)
    app.add_api_route(PREFIX + "/refresh-hypernetworks", refresh_hypernetworks, methods=["POST"],
                      include_in_schema=False)
    app.add_api_route(PREFIX, to_page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route(PREFIX + "/{path:path}", proxy_http, methods=METHODS, include_in_schema=False)
    app.add_api_websocket_route(PREFIX + "/{path:path}", proxy_websocket)
    # ...and ours before the webui's and gradio's, so no pattern route of theirs can shadow them
    routes = app.router.routes
    routes[:] = routes[before:] + routes[:before]
    app._sidetrain_mounted = proxy
    return proxy
