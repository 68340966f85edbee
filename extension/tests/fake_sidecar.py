"""A small stand-in sidecar (Starlette) that checks requests the way the real one does (issue 7:
Host must be its own name, a foreign Origin is refused, a configured token is required) and
reports what it received, so the tests can see what the proxy forwarded.

Run as a program (`python3 fake_sidecar.py serve --port N ...`) it is also the `sidetrain`
executable the autostart test puts on PATH; it then writes its argv and SIDETRAIN_TOKEN to
$FAKE_SIDECAR_ARGS.
"""

import hashlib
import json
import os
import sys
import threading

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket


def make_app(port: int, token: str = "") -> Starlette:
    own_hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
    own_origins = {f"http://{host}" for host in own_hosts}
    state = {"requests": [], "release": threading.Event()}

    def refusal(conn):
        if conn.headers.get("host") not in own_hosts:
            return 403, "bad host"
        origin = conn.headers.get("origin")
        if origin is not None and origin not in own_origins:
            return 403, "foreign origin"
        if token and conn.headers.get("authorization") != f"Bearer {token}":
            return 401, "token required"
        return None

    async def guard(request: Request, handler):
        state["requests"].append({"path": request.url.path, "headers": dict(request.headers)})
        refused = refusal(request)
        if refused:
            return JSONResponse({"error": refused[1]}, status_code=refused[0])
        return await handler(request)

    async def health(request):
        return JSONResponse({"ok": True, "name": "sidetrain", "version": "0.0.0-fake"})

    async def echo(request):
        body = await request.body()
        return JSONResponse({"method": request.method, "path": request.url.path, "query": request.url.query,
                             "headers": dict(request.headers), "bodyLength": len(body),
                             "bodySha256": hashlib.sha256(body).hexdigest()})

    async def stream(request):
        async def chunks():
            yield b"first\n"
            # the next chunk is only produced once the test has read the first one through the proxy
            released = await _wait(state["release"], 10)
            yield b"second\n" if released else b"timeout: the proxy buffered the response\n"
        return StreamingResponse(chunks(), media_type="text/plain")

    async def redirect(request):
        return RedirectResponse("/api/health", status_code=302)

    async def cookies(request):
        response = Response("ok")
        response.raw_headers += [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/")]
        return response

    async def not_found(request):
        return JSONResponse({"error": "no such job"}, status_code=404)

    def guarded(handler):
        async def route(request):
            return await guard(request, handler)
        return route

    async def ws(websocket: WebSocket):
        refused = refusal(websocket)
        if refused:
            await websocket.close(code=1008)
            return
        protocols = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=protocols[0] if protocols else None)
        await websocket.send_json({"type": "state", "path": websocket.url.path, "query": websocket.url.query,
                                   "headers": dict(websocket.headers)})
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "close-me":
                await websocket.close(code=4000)
                return
            if message.get("text") is not None:
                await websocket.send_text("echo:" + message["text"])
            else:
                await websocket.send_bytes(message["bytes"][::-1])

    routes = [
        Route("/api/health", guarded(health)),
        Route("/stream", guarded(stream)),
        Route("/redirect", guarded(redirect)),
        Route("/cookies", guarded(cookies)),
        Route("/api/jobs/missing", guarded(not_found)),
        Route("/{path:path}", guarded(echo), methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
        WebSocketRoute("/ws", ws),
        WebSocketRoute("/ws/{rest:path}", ws),
    ]
    app = Starlette(routes=routes)
    app.state.fake = state
    return app


async def _wait(event: threading.Event, timeout: float) -> bool:
    from starlette.concurrency import run_in_threadpool
    return await run_in_threadpool(event.wait, timeout)


def main(argv):
    """`fake_sidecar.py serve --host H --port P ...`: serve until killed."""
    import uvicorn

    if "--help" in argv:  # the options the launcher may pass, as `sidetrain serve --help` lists them
        print("Options:\n  --host <host>\n  --port <port>\n  --webui-url <url>\n  --webui-dir <dir>\n"
              "  --embeddings-dir <dir>\n  --hypernetwork-dir <dir>\n  --ckpt-dir <dir>\n  --lora-dir <dir>")
        return
    record = os.environ.get("FAKE_SIDECAR_ARGS")
    if record:
        with open(record, "w") as f:
            json.dump({"argv": argv, "token": os.environ.get("SIDETRAIN_TOKEN", ""),
                       "webui_auth": os.environ.get("SIDETRAIN_WEBUI_AUTH", "")}, f)
    port = int(argv[argv.index("--port") + 1])
    uvicorn.run(make_app(port, os.environ.get("SIDETRAIN_TOKEN", "")), host="127.0.0.1", port=port,
                log_level="warning", lifespan="off")


if __name__ == "__main__":
    main(sys.argv[1:])
