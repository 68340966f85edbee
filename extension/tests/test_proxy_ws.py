"""The WebSocket side of the proxy: browser ↔ webui `/sidetrain/ws…` ↔ fake sidecar `/ws…`."""

import asyncio
import json
import unittest

import support  # noqa: F401  (import paths)
import websockets
from fake_sidecar import make_app
from fastapi import FastAPI
from support import ServerThread, free_port

from sidetrain_ext import routes
from sidetrain_ext.config import Settings

TOKEN = "ws-token"


class ProxyWebSocketTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        port = free_port()
        cls.sidecar = ServerThread(make_app(port, TOKEN), port).__enter__()
        cls.settings = Settings(url=cls.sidecar.url, token=TOKEN, autostart=False, folder="")
        app = FastAPI()
        routes.mount(app, get_settings=lambda: cls.settings, authorized=lambda conn: True)
        cls.webui = ServerThread(app).__enter__()
        cls.ws_base = f"ws://127.0.0.1:{cls.webui.port}"
        cls.webui_origin = f"http://127.0.0.1:{cls.webui.port}"

    @classmethod
    def tearDownClass(cls):
        cls.webui.__exit__()
        cls.sidecar.__exit__()

    def run_async(self, coroutine):
        return asyncio.run(asyncio.wait_for(coroutine, 20))

    def test_messages_flow_both_ways_with_the_token_and_rewritten_origin(self):
        async def session():
            async with websockets.connect(self.ws_base + "/sidetrain/ws?job=abc123",
                                          origin=self.webui_origin) as ws:
                state = json.loads(await ws.recv())
                await ws.send("hello")
                text = await ws.recv()
                await ws.send(b"\x01\x02\x03")
                data = await ws.recv()
                return state, text, data

        state, text, data = self.run_async(session())
        self.assertEqual((state["type"], state["path"], state["query"]), ("state", "/ws", "job=abc123"))
        self.assertEqual(state["headers"]["authorization"], f"Bearer {TOKEN}")
        self.assertEqual(state["headers"]["origin"], self.sidecar.url)
        self.assertEqual(state["headers"]["host"], f"127.0.0.1:{self.sidecar.port}")
        self.assertEqual(text, "echo:hello")
        self.assertEqual(data, b"\x03\x02\x01")

    def test_subprotocol_and_sub_paths_are_relayed(self):
        async def session():
            async with websockets.connect(self.ws_base + "/sidetrain/ws/jobs/42",
                                          subprotocols=["sidetrain.v1"]) as ws:
                return ws.subprotocol, json.loads(await ws.recv())

        protocol, state = self.run_async(session())
        self.assertEqual(protocol, "sidetrain.v1")
        self.assertEqual(state["path"], "/ws/jobs/42")

    def test_the_sidecars_close_code_reaches_the_browser(self):
        async def session():
            async with websockets.connect(self.ws_base + "/sidetrain/ws") as ws:
                await ws.recv()
                await ws.send("close-me")
                with self.assertRaises(websockets.ConnectionClosed):
                    await ws.recv()
                return ws.close_code

        self.assertEqual(self.run_async(session()), 4000)

    def test_cross_site_websocket_is_refused(self):
        async def session():
            await websockets.connect(self.ws_base + "/sidetrain/ws", origin="http://evil.example")

        with self.assertRaises(Exception) as caught:
            self.run_async(session())
        self.assertIn("403", str(caught.exception))

    def test_sidecar_down_closes_the_browser_socket(self):
        saved = self.settings
        type(self).settings = Settings(url=f"http://127.0.0.1:{free_port()}", token="", autostart=False, folder="")

        async def session():
            await websockets.connect(self.ws_base + "/sidetrain/ws")

        try:
            with self.assertRaises(Exception):
                self.run_async(session())
        finally:
            type(self).settings = saved


if __name__ == "__main__":
    unittest.main()
