"""The HTTP side of the proxy: a stand-in webui (FastAPI with the extension's routes) in front of
the fake sidecar, both on real sockets. Every case runs with httpx and with the urllib fallback."""

import hashlib
import http.client
import json
import os
import unittest

import support  # noqa: F401  (import paths)
from fake_sidecar import make_app
from fastapi import FastAPI
from support import ServerThread, free_port

from sidetrain_ext import routes
from sidetrain_ext.config import Settings
from sidetrain_ext.proxy import confine

TOKEN = "s3cret-token"


def raw_request(port, method, path, headers=None, body=None):
    """http.client sends the path exactly as given (no `..` clean-up, unlike most clients)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


class ProxyHttpTest(unittest.TestCase):
    http_client = "httpx"

    @classmethod
    def setUpClass(cls):
        port = free_port()
        cls.sidecar_app = make_app(port, TOKEN)
        cls.sidecar = ServerThread(cls.sidecar_app, port).__enter__()
        cls.settings = Settings(url=cls.sidecar.url, token=TOKEN, autostart=False, folder="")
        cls.webui_app = FastAPI()
        routes.mount(cls.webui_app, get_settings=lambda: cls.settings, authorized=lambda conn: True,
                     http_client=cls.http_client)
        cls.webui = ServerThread(cls.webui_app).__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.webui.__exit__()
        cls.sidecar.__exit__()

    def get(self, path, headers=None, method="GET", body=None):
        return raw_request(self.webui.port, method, path, headers, body)

    def test_get_is_forwarded_with_path_query_and_token(self):
        response, data = self.get("/sidetrain/api/jobs?state=running&limit=5", {"Cookie": "session=webui"})
        self.assertEqual(response.status, 200, data)
        echo = json.loads(data)
        self.assertEqual(echo["path"], "/api/jobs")
        self.assertEqual(echo["query"], "state=running&limit=5")
        self.assertEqual(echo["headers"]["host"], f"127.0.0.1:{self.sidecar.port}")
        self.assertEqual(echo["headers"]["authorization"], f"Bearer {TOKEN}")
        self.assertEqual(echo["headers"]["x-forwarded-prefix"], "/sidetrain")
        self.assertNotIn("cookie", echo["headers"])  # the webui's cookies stay with the webui

    def test_same_origin_request_gets_the_sidecars_origin(self):
        webui_host = f"127.0.0.1:{self.webui.port}"
        response, data = self.get("/sidetrain/api/jobs", {"Origin": f"http://{webui_host}"}, "POST", b"{}")
        self.assertEqual(response.status, 200, data)
        self.assertEqual(json.loads(data)["headers"]["origin"], self.sidecar.url)

    def test_cross_site_requests_are_refused_not_laundered(self):
        response, data = self.get("/sidetrain/api/jobs", {"Origin": "http://evil.example"}, "POST", b"{}")
        self.assertEqual(response.status, 403, data)
        response, _ = self.get("/sidetrain/api/jobs", {"Sec-Fetch-Site": "cross-site"})
        self.assertEqual(response.status, 403)

    def test_without_a_token_setting_the_pages_own_token_passes_through(self):
        saved = self.settings
        type(self).settings = Settings(url=saved.url, token="", autostart=False, folder="")
        try:
            response, _ = self.get("/sidetrain/api/jobs")
            self.assertEqual(response.status, 401)  # the sidecar wants a token the webui does not have
            response, data = self.get("/sidetrain/api/jobs", {"Authorization": f"Bearer {TOKEN}"})
            self.assertEqual(response.status, 200, data)
        finally:
            type(self).settings = saved

    def test_head_and_delete(self):
        response, data = self.get("/sidetrain/api/jobs/abc", method="DELETE")
        self.assertEqual((response.status, json.loads(data)["method"]), (200, "DELETE"))
        response, data = self.get("/sidetrain/api/health", method="HEAD")
        self.assertEqual((response.status, data), (200, b""))

    def test_post_body_arrives_intact(self):
        body = os.urandom(1 << 20)
        response, data = self.get("/sidetrain/api/upload", {"Content-Type": "application/octet-stream"}, "PUT", body)
        self.assertEqual(response.status, 200, data[:200])
        echo = json.loads(data)
        self.assertEqual((echo["method"], echo["bodyLength"]), ("PUT", len(body)))
        self.assertEqual(echo["bodySha256"], hashlib.sha256(body).hexdigest())

    def test_response_is_streamed_not_buffered(self):
        state = self.sidecar_app.state.fake
        state["release"].clear()
        conn = http.client.HTTPConnection("127.0.0.1", self.webui.port, timeout=20)
        conn.request("GET", "/sidetrain/stream")
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        first = response.readline()  # arrives while the sidecar still holds back the second chunk
        state["release"].set()
        rest = response.read()
        conn.close()
        self.assertEqual(first, b"first\n")
        self.assertEqual(rest, b"second\n")

    def test_errors_and_redirects_and_cookies_pass_through(self):
        response, data = self.get("/sidetrain/api/jobs/missing")
        self.assertEqual((response.status, json.loads(data)), (404, {"error": "no such job"}))
        response, _ = self.get("/sidetrain/redirect")
        self.assertEqual(response.status, 302)
        self.assertEqual(response.getheader("location"), "/sidetrain/api/health")
        response, _ = self.get("/sidetrain/cookies")
        self.assertEqual(sorted(v for k, v in response.getheaders() if k.lower() == "set-cookie"),
                         ["a=1; Path=/", "b=2; Path=/"])

    def test_bare_prefix_redirects_to_the_page(self):
        response, _ = self.get("/sidetrain")
        self.assertEqual(response.status, 307)
        self.assertEqual(response.getheader("location"), "/sidetrain/")
        response, data = self.get("/sidetrain/")
        self.assertEqual(json.loads(data)["path"], "/")

    def test_paths_cannot_escape_the_prefix(self):
        seen = self.sidecar_app.state.fake["requests"]
        for path in ("/sidetrain/../secret", "/sidetrain/a/../../secret", "/sidetrain/%2e%2e/secret",
                     "/sidetrain/a/%2E%2E/%2e%2e/secret", "/sidetrain/%252e%252e/secret",
                     "/sidetrain/..%5csecret", "/sidetrain/./api", "/sidetrain/a%00b"):
            with self.subTest(path=path):
                before = len(seen)
                response, data = self.get(path)
                self.assertEqual(response.status, 400, data)
                self.assertEqual(len(seen), before)  # the sidecar never saw it

    def test_sidecar_down_is_a_502_that_says_what_to_do(self):
        saved = self.settings
        type(self).settings = Settings(url=f"http://127.0.0.1:{free_port()}", token="", autostart=False, folder="")
        try:
            response, data = self.get("/sidetrain/api/health")
        finally:
            type(self).settings = saved
        self.assertEqual(response.status, 502)
        self.assertIn("sidetrain serve", json.loads(data)["error"])


class ProxyHttpUrllibTest(ProxyHttpTest):
    """The same cases through the urllib fallback (a webui without httpx)."""
    http_client = "urllib"


class ConfineTest(unittest.TestCase):
    def test_confine(self):
        self.assertEqual(confine("api/jobs"), "/api/jobs")
        self.assertEqual(confine(""), "/")
        self.assertEqual(confine("//evil.example/x"), "/evil.example/x")
        for bad in ("..", "a/../..", "./x", "a/%2e%2e/b", "a\\..\\b", "a%5cb", "x\x00y", "%2E"):
            self.assertIsNone(confine(bad), bad)


class LoginTest(unittest.TestCase):
    """With `--gradio-auth` the proxy needs gradio's login cookie (the routes are not gradio's)."""

    def test_gradio_login_cookie_is_required_when_the_webui_has_a_login(self):
        from starlette.requests import Request

        from sidetrain_ext.webui import authorized_by_gradio

        def conn(cookie):
            headers = [(b"cookie", cookie.encode())] if cookie else []
            return Request({"type": "http", "headers": headers})

        class App:
            auth = {"user": "pass"}
            tokens = {"tok123": "user"}

        check = authorized_by_gradio(App())
        self.assertTrue(check(conn("access-token=tok123")))
        self.assertTrue(check(conn("access-token-unsecure-abc=tok123")))  # gradio 4 cookie names
        self.assertFalse(check(conn("access-token=forged")))
        self.assertFalse(check(conn("")))
        self.assertTrue(authorized_by_gradio(type("NoLogin", (), {"auth": None})())(conn("")))


if __name__ == "__main__":
    unittest.main()
