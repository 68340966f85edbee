"""The extension inside a (stand-in) webui: callbacks registered by scripts/sidetrain.py, the tab,
the settings it adds and reads, the folders per webui shape, and the hypernetwork refresh route."""

import importlib.util
import os
import tempfile
import unittest

import support  # noqa: F401  (import paths)
import gradio
import httpx
from fastapi import FastAPI
from modules import script_callbacks, shared, shared_items
from support import EXTENSION_DIR, make_webui

from sidetrain_ext import DEFAULT_URL, config, routes, webui


def load_script():
    """Load scripts/sidetrain.py the way the webui does (by path, as a fresh module)."""
    script_callbacks.clear()
    path = os.path.join(EXTENSION_DIR, "scripts", "sidetrain.py")
    spec = importlib.util.spec_from_file_location("sidetrain_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WebuiCase(unittest.TestCase):
    kind = "a1111"

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.folders = make_webui(self.tmp.name, self.kind)
        self.env = {k: os.environ.pop(k) for k in ("SIDETRAIN_URL", "SIDETRAIN_TOKEN") if k in os.environ}

    def tearDown(self):
        os.environ.update(self.env)
        self.tmp.cleanup()


class CallbacksTest(WebuiCase):
    def test_script_registers_tab_train_tab_settings_and_app_started(self):
        load_script()
        registered = {name: len(cbs) for name, cbs in script_callbacks.callbacks.items()}
        self.assertEqual(registered, {"ui_tabs": 1, "ui_train_tabs": 1, "ui_settings": 1, "app_started": 1})

    def test_no_train_tab_where_the_webui_has_no_such_callback(self):
        saved = script_callbacks.on_ui_train_tabs
        del script_callbacks.on_ui_train_tabs  # SD.Next
        try:
            load_script()
        finally:
            script_callbacks.on_ui_train_tabs = saved
        self.assertEqual(script_callbacks.callbacks["ui_train_tabs"], [])
        self.assertEqual(len(script_callbacks.callbacks["ui_tabs"]), 1)

    def test_tab_embeds_the_proxied_page(self):
        load_script()
        gradio.created.clear()
        [(block, title, elem_id)] = script_callbacks.callbacks["ui_tabs"][0]()
        self.assertIsInstance(block, gradio.Blocks)
        self.assertEqual((title, elem_id), ("sidetrain", "sidetrain"))
        [html] = [c for c in gradio.created if isinstance(c, gradio.HTML)]
        self.assertIn('<iframe src="sidetrain/"', html.value)
        gradio.created.clear()
        script_callbacks.callbacks["ui_train_tabs"][0](object())
        self.assertEqual([type(c).__name__ for c in gradio.created], ["Tab", "HTML"])

    def test_app_started_mounts_the_routes(self):
        load_script()
        app = FastAPI()
        script_callbacks.callbacks["app_started"][0](None, app)
        paths = [route.path for route in app.router.routes]
        self.assertEqual(paths[:4], ["/sidetrain/refresh-hypernetworks", "/sidetrain",
                                     "/sidetrain/{path:path}", "/sidetrain/{path:path}"])
        script_callbacks.callbacks["app_started"][0](None, app)  # a second call adds nothing
        self.assertEqual(len(app.router.routes), len(paths))


class SettingsTest(WebuiCase):
    def test_settings_section_and_defaults(self):
        load_script()
        script_callbacks.callbacks["ui_settings"][0]()
        labels = shared.opts.data_labels
        self.assertEqual(sorted(labels), ["sidetrain_autostart", "sidetrain_folder", "sidetrain_token", "sidetrain_url"])
        self.assertTrue(all(info.section == ("sidetrain", "sidetrain") for info in labels.values()))
        self.assertTrue(labels["sidetrain_token"].restrict_api)
        self.assertEqual(labels["sidetrain_token"].component_args, {"type": "password"})
        self.assertEqual(config.read_settings(), config.Settings(DEFAULT_URL, "", False, ""))

    def test_settings_without_restrict_api(self):
        class OldOptionInfo(shared.OptionInfo):  # A1111 < 1.6, SD.Next
            def __init__(self, default=None, label="", component=None, component_args=None, section=None):
                super().__init__(default, label, component, component_args, section=section)

        saved, shared.OptionInfo = shared.OptionInfo, OldOptionInfo
        try:
            load_script()
            script_callbacks.callbacks["ui_settings"][0]()
        finally:
            shared.OptionInfo = saved
        self.assertEqual(len(shared.opts.data_labels), 4)

    def test_flags_win_over_settings_which_win_over_env(self):
        load_script()
        script_callbacks.callbacks["ui_settings"][0]()
        os.environ["SIDETRAIN_TOKEN"] = "from-env"
        self.assertEqual(config.read_settings().token, "from-env")
        shared.opts.sidetrain_url = "http://127.0.0.1:9999/"
        shared.opts.sidetrain_token = "from-settings"
        shared.opts.sidetrain_autostart = True
        shared.opts.sidetrain_folder = "/opt/sidetrain"
        self.assertEqual(config.read_settings(),
                         config.Settings("http://127.0.0.1:9999", "from-settings", True, "/opt/sidetrain"))
        shared.cmd_opts.sidetrain_url = "http://127.0.0.1:7000"
        shared.cmd_opts.sidetrain_token = "from-flag"
        self.assertEqual(config.read_settings().url, "http://127.0.0.1:7000")
        self.assertEqual(config.read_settings().token, "from-flag")


class FoldersA1111Test(WebuiCase):
    def test_folders_from_cmd_opts_with_the_webuis_defaults(self):
        folders = config.resolve_folders()
        self.assertEqual(folders, self.folders)  # ckpt_dir None → models/Stable-diffusion

    def test_relative_flags_resolve_against_the_webui_root(self):
        shared.cmd_opts.embeddings_dir = "my-embeddings"
        del shared.cmd_opts.lora_dir  # the Lora extension disabled: default place
        folders = config.resolve_folders()
        self.assertEqual(folders["embeddings_dir"], os.path.join(self.tmp.name, "my-embeddings"))
        self.assertEqual(folders["lora_dir"], os.path.join(self.tmp.name, "models", "Lora"))

    def test_webui_url_from_flags(self):
        self.assertEqual(config.webui_url(), "http://127.0.0.1:7860")
        shared.cmd_opts.port, shared.cmd_opts.subpath = 7861, "/sd"
        self.assertEqual(config.webui_url(), "http://127.0.0.1:7861/sd")


class FoldersSdNextTest(WebuiCase):
    kind = "sdnext"

    def test_folders_from_opts(self):
        self.assertEqual(config.resolve_folders(), self.folders)
        shared.opts.hypernetwork_dir = "/elsewhere/hn"
        self.assertEqual(config.resolve_folders()["hypernetwork_dir"], "/elsewhere/hn")


class RefreshTest(WebuiCase):
    """POST /sidetrain/refresh-hypernetworks reloads the webui's list (ASGI in-process client)."""

    def post(self, client_host="127.0.0.1", headers=None, token=""):
        app = FastAPI()
        settings = config.Settings(DEFAULT_URL, token, False, "")
        routes.mount(app, get_settings=lambda: settings, authorized=lambda conn: False)
        transport = httpx.ASGITransport(app=app, client=(client_host, 50000))

        async def call():
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:7860") as client:
                return await client.post("/sidetrain/refresh-hypernetworks", json={}, headers=headers or {})

        import asyncio
        return asyncio.run(call())

    def write_hypernetwork(self, name):
        with open(os.path.join(self.folders["hypernetwork_dir"], name + ".pt"), "wb") as f:
            f.write(b"\0")

    def test_calls_the_webuis_reload_and_lists_the_new_file(self):
        self.write_hypernetwork("pallas_cat")
        response = self.post()
        self.assertEqual(response.status_code, 200, response.text)
        self.assertEqual(response.json(), {"ok": True, "hypernetworks": ["pallas_cat"]})
        self.assertEqual(shared_items.calls, ["shared_items"])
        self.assertIn("pallas_cat", shared.hypernetworks)

    def test_only_the_sidecar_may_call_it(self):
        self.assertEqual(self.post(client_host="10.1.2.3").status_code, 403)
        self.assertEqual(self.post(client_host="10.1.2.3", token="t",
                                   headers={"Authorization": "Bearer wrong"}).status_code, 403)
        self.assertEqual(self.post(client_host="10.1.2.3", token="t",
                                   headers={"Authorization": "Bearer t"}).status_code, 200)
        self.assertEqual(self.post(headers={"Origin": "http://evil.example"}).status_code, 403)

    def test_fallback_to_list_hypernetworks(self):
        import sys
        saved = sys.modules["modules.shared_items"]
        sys.modules["modules.shared_items"] = None
        try:
            self.write_hypernetwork("fallback")
            response = self.post()
        finally:
            sys.modules["modules.shared_items"] = saved
        self.assertEqual(response.json()["hypernetworks"], ["fallback"])

    def test_webui_without_hypernetworks_is_a_501(self):
        import sys
        saved = {k: sys.modules[k] for k in ("modules.shared_items", "modules.hypernetworks.hypernetwork")}
        sys.modules.update(dict.fromkeys(saved))
        shared.__dict__.pop("reload_hypernetworks", None)  # SD.Next shape keeps it here
        try:
            self.assertIsNone(webui.find_reload_function())
            self.assertEqual(self.post().status_code, 501)
        finally:
            sys.modules.update(saved)


class RefreshSdNextTest(RefreshTest):
    kind = "sdnext"

    def test_calls_the_webuis_reload_and_lists_the_new_file(self):
        self.write_hypernetwork("pallas_cat")
        self.assertEqual(self.post().json(), {"ok": True, "hypernetworks": ["pallas_cat"]})
        self.assertEqual(shared_items.calls, ["shared"])  # modules.shared.reload_hypernetworks


if __name__ == "__main__":
    unittest.main()
