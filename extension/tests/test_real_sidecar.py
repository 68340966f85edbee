"""The proxy in front of the real sidecar (`node bin/sidetrain.mjs serve`), with a token set: the
sidecar's own Host/Origin/token checks must accept what the proxy forwards, HTTP and WebSocket.
Skipped (with the reason) where node, the repository's node_modules or `serve` are missing."""

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.request

import support  # noqa: F401  (import paths)
import websockets
from fastapi import FastAPI
from support import EXTENSION_DIR, ServerThread, free_port

from sidetrain_ext import launcher, routes
from sidetrain_ext.config import Settings

REPO_DIR = os.path.dirname(EXTENSION_DIR)
TOKEN = "real-sidecar-token"


def skip_reason():
    if not shutil.which("node"):
        return "node is not on PATH"
    if not os.path.isdir(os.path.join(REPO_DIR, "node_modules")):
        return f"{REPO_DIR}/node_modules is missing (run npm install)"
    if not os.path.isfile(os.path.join(REPO_DIR, "bridge", "commands", "serve.ts")):
        return "bridge/commands/serve.ts does not exist yet"
    return None


@unittest.skipIf(skip_reason(), skip_reason())
class RealSidecarTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.state = tempfile.TemporaryDirectory()
        port = free_port()
        cls.settings = Settings(url=f"http://127.0.0.1:{port}", token=TOKEN, autostart=False, folder="")
        env = dict(os.environ, SIDETRAIN_TOKEN=TOKEN)
        for key in ("SIDETRAIN_WEBUI_URL", "SIDETRAIN_WEBUI_DIR", "SIDETRAIN_HOST", "SIDETRAIN_PORT"):
            env.pop(key, None)
        cls.log = open(os.path.join(cls.state.name, "sidecar.log"), "wb")
        cls.process = subprocess.Popen(
            ["node", "bin/sidetrain.mjs", "serve", "--port", str(port), "--state-dir", cls.state.name,
             "--log-level", "warn"], cwd=REPO_DIR, env=env, stdout=cls.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while not launcher.health(cls.settings):
            if cls.process.poll() is not None or time.monotonic() > deadline:
                cls.tearDownClass()
                raise RuntimeError("the sidecar did not start; see its log in the test's state dir")
            time.sleep(0.3)
        app = FastAPI()
        routes.mount(app, get_settings=lambda: cls.settings, authorized=lambda conn: True)
        cls.webui = ServerThread(app).__enter__()
        cls.origin = f"http://127.0.0.1:{cls.webui.port}"

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "webui", None):
            cls.webui.__exit__()
        cls.process.terminate()
        try:
            cls.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            cls.process.kill()
        cls.log.close()
        cls.state.cleanup()

    def request(self, url, method="GET", body=None, headers=None):
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP_PROXY detours
        try:
            with opener.open(req, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def test_the_token_is_added_by_the_proxy(self):
        status, _ = self.request(self.settings.url + "/api/health")
        self.assertEqual(status, 401)  # the sidecar really wants the token...
        status, body = self.request(f"{self.origin}/sidetrain/api/health")
        self.assertEqual(status, 200, body)  # ...and the browser side never needs it
        self.assertEqual(json.loads(body)["name"], "sidetrain")

    def test_a_same_origin_post_passes_the_sidecars_origin_check(self):
        status, body = self.request(f"{self.origin}/sidetrain/api/jobs", "POST", b'{"type": 1}',
                                    {"Content-Type": "application/json", "Origin": self.origin})
        self.assertEqual(status, 400, body)  # a schema error from the sidecar, not 403/421
        self.assertIn("/type", body.decode())

    def test_websocket_events_through_the_proxy(self):
        async def session():
            async with websockets.connect(f"ws://127.0.0.1:{self.webui.port}/sidetrain/api/events",
                                          origin=self.origin) as ws:
                await (await ws.ping())  # a pong came back through both hops
                return True

        self.assertTrue(asyncio.run(asyncio.wait_for(session(), 30)))

    def test_serve_help_lists_the_flags_the_launcher_uses(self):
        flags = launcher.supported_flags(["node", os.path.join(REPO_DIR, "bin", "sidetrain.mjs")])
        self.assertTrue({"--host", "--port", "--webui-url", "--webui-dir"} <= flags, flags)


if __name__ == "__main__":
    unittest.main()
