"""Test support: import paths, webui shapes (A1111/Forge vs SD.Next) on the stand-ins, and a
uvicorn server in a thread on a free 127.0.0.1 port."""

import argparse
import logging
import os
import socket
import sys
import threading
import time

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
EXTENSION_DIR = os.path.dirname(TESTS_DIR)
STUBS_DIR = os.path.join(TESTS_DIR, "stubs")
for _path in (EXTENSION_DIR, STUBS_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

try:
    import fastapi  # noqa: E402,F401
    import httpx  # noqa: E402,F401
    import uvicorn  # noqa: E402
    import websockets  # noqa: E402,F401
except ImportError as err:  # pragma: no cover
    raise ImportError(f"{err}: the extension's tests need Debian's python3 with the packages in "
                      "extension/tests/REQUIREMENTS.md (run them with /usr/bin/python3)") from err
from modules import paths, shared, shared_items  # noqa: E402
from sidetrain_ext import config  # noqa: E402

# An installed copy has the sidecar.json that install-extension wrote; the tests start from a webui
# without one (test_installed.py reads the real one on purpose).
INSTALLED_FILE = config.INSTALLED_FILE
config.INSTALLED_FILE = os.path.join(TESTS_DIR, "no-such-sidecar.json")

logging.getLogger("sidetrain").setLevel(logging.ERROR)  # "sidecar not reachable" is what some tests provoke


def make_webui(root: str, kind: str = "a1111") -> dict:
    """Shape the stand-ins like a webui installed at `root` and return its folders.
    a1111 (also Forge): folders in cmd_opts, ckpt_dir None, lora_dir from the Lora preload.
    sdnext: folders in opts, nothing in cmd_opts, reload_hypernetworks in shared."""
    models = os.path.join(root, "models")
    folders = {
        "embeddings_dir": os.path.join(root, "embeddings") if kind == "a1111" else os.path.join(models, "embeddings"),
        "hypernetwork_dir": os.path.join(models, "hypernetworks"),
        "ckpt_dir": os.path.join(models, "Stable-diffusion"),
        "lora_dir": os.path.join(models, "Lora"),
    }
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    paths.script_path, paths.data_path, paths.models_path = root, root, models
    shared.opts = shared.Options()
    shared.hypernetworks = {}
    shared_items.calls.clear()
    sys.modules["modules.shared_items"] = shared_items  # restore after an SD.Next-shaped test
    if hasattr(shared, "reload_hypernetworks"):
        del shared.reload_hypernetworks
    if kind == "a1111":
        shared.cmd_opts = argparse.Namespace(
            embeddings_dir=folders["embeddings_dir"], hypernetwork_dir=folders["hypernetwork_dir"],
            ckpt_dir=None, lora_dir=folders["lora_dir"], port=None, data_dir=root)
    else:
        shared.cmd_opts = argparse.Namespace(port=7860)
        for key, value in folders.items():
            setattr(shared.opts, key, value)
        sys.modules["modules.shared_items"] = None  # SD.Next has no shared_items.reload_hypernetworks

        def reload_hypernetworks():  # SD.Next modules/shared.py, reading opts.hypernetwork_dir
            from modules.hypernetworks import hypernetwork
            shared_items.calls.append("shared")
            shared.hypernetworks = hypernetwork.list_hypernetworks(shared.opts.hypernetwork_dir)

        shared.reload_hypernetworks = reload_hypernetworks
    return dict(folders, webui_dir=root, data_dir=root)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """An ASGI app served by uvicorn on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app, port: int = 0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not allowed outside the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
