"""Reverse proxy `/sidetrain/<path>` on the webui's origin → `<sidecar>/<path>`, HTTP and WebSocket.

Why a proxy at all: the page in the tab must work when the webui is opened from another machine
(`--listen`, `--share`, a reverse proxy in front), where the browser cannot reach 127.0.0.1:7862.
The proxy also keeps the sidecar's bearer token out of the browser: it is added here.

The sidecar refuses requests whose Host is not its own name and whose Origin is a foreign site
(DNS rebinding, cross-site requests). The proxy therefore (1) does the same check itself against
the *webui's* origin — a foreign Origin or `Sec-Fetch-Site: cross-site` is refused here, never
laundered — and (2) rewrites Host and Origin to the sidecar's own before forwarding.

HTTP goes through httpx when the webui has it (A1111, Forge and SD.Next all ship it with gradio),
streamed both ways; otherwise urllib in a thread. WebSocket goes through the `websockets` client
(also a gradio dependency), both its legacy (≤13) and new (≥14) `connect` signatures.
"""

import asyncio
import inspect
import json
import logging
import urllib.error
import urllib.request
from typing import Callable, Optional
from urllib.parse import quote, unquote, urlsplit

from starlette.background import BackgroundTask
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket

from . import PREFIX
from .config import Settings, start_command

try:
    import httpx
except ImportError:  # pragma: no cover - every webui ships httpx; urllib is the fallback
    httpx = None

log = logging.getLogger("sidetrain")

# RFC 9110 §7.6.1 hop-by-hop headers, plus those the proxy sets itself.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade"}
# Accept-Encoding is dropped so the sidecar answers uncompressed: the webui's own GZipMiddleware
# (A1111 `initialize_util.setup_middleware`) would otherwise compress a gzip body a second time.
REPLACED = {"host", "origin", "referer", "cookie", "authorization", "accept-encoding",
            "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-prefix"}
WS_HANDSHAKE = {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                "sec-websocket-protocol", "sec-websocket-accept"}
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CHUNK = 64 * 1024


def confine(sub_path: str) -> Optional[str]:
    """The sidecar path for `/sidetrain/<sub_path>` (already percent-decoded by the server), or None
    if it could escape the prefix: `.`/`..` segments (also once more decoded, for an upstream that
    decodes again), backslashes or NUL bytes."""
    for candidate in (sub_path, unquote(sub_path)):
        if "\x00" in candidate or "\\" in candidate:
            return None
        if any(segment in (".", "..") for segment in candidate.split("/")):
            return None
    return "/" + sub_path.lstrip("/")


def same_origin(conn: HTTPConnection) -> bool:
    """True unless the browser says the request comes from another site (Origin or Sec-Fetch-Site)."""
    if conn.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return False
    origin = conn.headers.get("origin")
    if origin is None:
        return True  # same-origin GETs and non-browser clients send none
    hosts = {conn.headers.get("host", "").lower(), conn.headers.get("x-forwarded-host", "").lower()}
    return urlsplit(origin).netloc.lower() in hosts - {""}


def sidecar_origin(settings: Settings) -> str:
    parts = urlsplit(settings.url)
    return f"{parts.scheme}://{parts.netloc}"


def forward_headers(conn: HTTPConnection, settings: Settings, drop=frozenset()) -> list:
    """Request headers for the sidecar: the browser's, minus hop-by-hop and cookies, with Host/Origin
    set to the sidecar's own, the settings' token (if any) added and X-Forwarded-* describing the
    webui side (so the sidecar can build links under `/sidetrain/` if it wants to)."""
    # with no token in the settings, a token the page itself sends (it asks the user) passes through
    replaced = REPLACED if settings.token else REPLACED - {"authorization"}
    headers = [(k, v) for k, v in conn.headers.items()
               if k.lower() not in HOP_BY_HOP | replaced | drop]
    headers.append(("host", urlsplit(settings.url).netloc))
    if "origin" in conn.headers:
        headers.append(("origin", sidecar_origin(settings)))
    if settings.token:
        headers.append(("authorization", f"Bearer {settings.token}"))
    headers += [("x-forwarded-host", conn.headers.get("host", "")),
                ("x-forwarded-proto", conn.url.scheme.replace("ws", "http")),
                ("x-forwarded-prefix", PREFIX)]
    if conn.client:
        headers.append(("x-forwarded-for", conn.client.host))
    return headers


def rewrite_location(location: str, settings: Settings) -> str:
    """Keep redirects inside the prefix: `/x` and `<sidecar>/x` become `/sidetrain/x`."""
    base = settings.url.rstrip("/")
    if location.startswith(base + "/") or location == base:
        location = location[len(base):] or "/"
    if location.startswith("/") and not location.startswith("//"):
        return PREFIX + location
    return location


def error_response(status: int, message: str) -> Response:
    return Response(json.dumps({"error": message}), status_code=status, media_type="application/json")


def _response_headers(items, settings: Settings) -> list:
    out = []
    for key, value in items:
        lower = key.lower()
        if lower in HOP_BY_HOP:
            continue
        if lower == "location":
            value = rewrite_location(value, settings)
        out.append((lower.encode("latin-1"), value.encode("latin-1")))
    return out


def _streamed(status: int, raw_headers: list, body, on_close) -> StreamingResponse:
    response = StreamingResponse(body, status_code=status, background=BackgroundTask(on_close))
    response.raw_headers = raw_headers  # keeps repeated headers (Set-Cookie) and upstream's lengths
    return response


class Proxy:
    """The two handlers the routes call. `get_settings()` is read on every request; `authorized(conn)`
    is the webui's own login check (True when the webui has none)."""

    def __init__(self, get_settings: Callable[[], Settings],
                 authorized: Callable[[HTTPConnection], bool] = lambda conn: True,
                 http_client: Optional[str] = None):
        self.get_settings = get_settings
        self.authorized = authorized
        self.http_client = http_client or ("httpx" if httpx is not None else "urllib")

    def _refusal(self, conn: HTTPConnection, sub_path: str):
        """(status, message) if the request must not be forwarded, else None."""
        if not self.authorized(conn):
            return 401, "log in to the webui first"
        if not same_origin(conn):
            return 403, "cross-site request refused"
        if confine(sub_path) is None:
            return 400, f"path escapes {PREFIX}/"
        return None

    def _target(self, conn: HTTPConnection, settings: Settings, sub_path: str) -> str:
        path = quote(confine(sub_path), safe="/:@!$&'()*+,;=-._~%")
        query = conn.url.query
        return settings.url + path + (f"?{query}" if query else "")

    async def http(self, request: Request, sub_path: str) -> Response:
        refusal = self._refusal(request, sub_path)
        if refusal:
            return error_response(*refusal)
        settings = self.get_settings()
        url = self._target(request, settings, sub_path)
        headers = forward_headers(request, settings)
        try:
            if self.http_client == "httpx":
                return await self._via_httpx(request, url, headers, settings)
            return await self._via_urllib(request, url, headers, settings)
        except (OSError, asyncio.TimeoutError) as err:
            return self._unreachable(settings, err)
        except Exception as err:  # httpx.RequestError and friends
            if httpx is not None and isinstance(err, httpx.RequestError):
                return self._unreachable(settings, err)
            raise

    @staticmethod
    def _unreachable(settings: Settings, err) -> Response:
        log.warning("sidetrain: sidecar at %s not reachable: %s", settings.url, err)
        # `npx sidetrain serve` fails in the webui's folder (sidetrain is not installed there): say what works
        return error_response(502, f"the sidetrain sidecar at {settings.url} is not reachable ({err}); "
                                   f"start it: {start_command(settings)}; or tick Settings → sidetrain → "
                                   "Start the sidecar with the webui")

    @staticmethod
    def _has_body(request: Request) -> bool:
        return request.method in BODY_METHODS and (
            "content-length" in request.headers or "transfer-encoding" in request.headers)

    async def _via_httpx(self, request: Request, url: str, headers: list, settings: Settings) -> Response:
        client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), trust_env=False)
        try:
            body = request.stream() if self._has_body(request) else None
            upstream = await client.send(
                client.build_request(request.method, url, headers=headers, content=body), stream=True)
        except BaseException:
            await client.aclose()
            raise

        async def close():
            await upstream.aclose()
            await client.aclose()

        raw = _response_headers(upstream.headers.multi_items(), settings)
        return _streamed(upstream.status_code, raw, upstream.aiter_raw(), close)

    async def _via_urllib(self, request: Request, url: str, headers: list, settings: Settings) -> Response:
        body = await request.body() if self._has_body(request) else None
        plain = {k: v for k, v in headers if k.lower() != "transfer-encoding"}
        upstream = await run_in_threadpool(_urllib_open, request.method, url, plain, body)
        read = getattr(upstream, "read1", upstream.read)  # read1: whatever has arrived, no waiting for CHUNK
        chunks = iterate_in_threadpool(iter(lambda: read(CHUNK), b""))
        raw = _response_headers(upstream.headers.items(), settings)
        return _streamed(upstream.status, raw, chunks, lambda: upstream.close())

    async def websocket(self, ws: WebSocket, sub_path: str) -> None:
        refusal = self._refusal(ws, sub_path)
        if refusal:
            await ws.close(code=1008)
            return
        settings = self.get_settings()
        url = self._target(ws, settings, sub_path).replace("http", "ws", 1)
        try:
            upstream = await _ws_connect(url, forward_headers(ws, settings, drop=WS_HANDSHAKE),
                                         sidecar_origin(settings), ws.scope.get("subprotocols") or None)
        except Exception as err:
            log.warning("sidetrain: WebSocket to %s failed: %s", url, err)
            await ws.close(code=1011)
            return
        await ws.accept(subprotocol=upstream.subprotocol)
        await _relay(ws, upstream)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects go back to the browser (rewritten), as with httpx, instead of being followed here."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _urllib_open(method: str, url: str, headers: dict, body: Optional[bytes]):
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        return opener.open(req, timeout=300)
    except urllib.error.HTTPError as err:  # a 4xx/5xx/3xx is still the sidecar's answer to pass on
        return err


async def _ws_connect(url: str, headers: list, origin: str, subprotocols):
    """`websockets.connect` across versions: ≥14 takes `additional_headers`, ≤13 `extra_headers`."""
    import websockets  # imported here: a webui without it still gets the HTTP proxy

    params = inspect.signature(websockets.connect).parameters
    header_arg = "additional_headers" if "additional_headers" in params else "extra_headers"
    # the handshake's own headers (Origin, Host) are set by the client from `origin` and the URL
    extra = [(k, v) for k, v in headers if k not in ("origin", "host")]
    return await websockets.connect(url, origin=origin, subprotocols=subprotocols, max_size=2 ** 26,
                                    open_timeout=10, **{header_arg: extra})


async def _relay(ws: WebSocket, upstream) -> None:
    """Copy messages both ways until either side closes; the other side is then closed too."""

    async def browser_to_sidecar():
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("text") if message.get("text") is not None else message.get("bytes")
            if data is not None:
                await upstream.send(data)

    async def sidecar_to_browser():
        try:
            async for data in upstream:
                await (ws.send_text(data) if isinstance(data, str) else ws.send_bytes(data))
        except Exception:  # ConnectionClosedError: fall through to closing the browser side
            pass

    tasks = [asyncio.ensure_future(browser_to_sidecar()), asyncio.ensure_future(sidecar_to_browser())]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await upstream.close()
    code = upstream.close_code if upstream.close_code not in (None, 1005, 1006) else 1000
    try:
        await ws.close(code=code)
    except Exception:  # the browser already went away
        pass
