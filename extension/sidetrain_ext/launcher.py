"""Start the sidecar with the webui (setting "autostart"), when none is answering already.

`sidetrain serve` is started with the webui's folders and URL, so its outputs land where the
webui looks and it can tell the webui to refresh. Which sidetrain runs:
- setting "sidetrain folder" set → `node <folder>/bin/sidetrain.mjs serve …` (a git checkout with
  `npm install` done);
- else `sidetrain` on PATH (`npm install -g`), else `npx --no-install sidetrain` (a local install;
  `--no-install` so npx never fetches a package of that name from the registry by itself).
The token goes to the child in `SIDETRAIN_TOKEN` and the webui's own API credentials (`--api-auth`,
SD.Next `--auth`) in `SIDETRAIN_WEBUI_AUTH` (not argv, which other users can read), its
output to `<extension>/sidecar.log`. The process started here is stopped when the webui exits
normally; on Ctrl+C the terminal's SIGINT reaches it too (same process group).
"""

import atexit
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from typing import Optional
from urllib.parse import urlsplit

from .config import Settings, read_settings, resolve_folders, webui_api_auth, webui_url

log = logging.getLogger("sidetrain")

EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_PATH = os.path.join(EXTENSION_DIR, "sidecar.log")
# folder key (config.resolve_folders) → `sidetrain serve` flag. Only the flags the installed
# sidetrain lists in `serve --help` are passed (commander exits on an unknown option).
FOLDER_FLAGS = {
    "embeddings_dir": "--embeddings-dir",
    "hypernetwork_dir": "--hypernetwork-dir",
    "ckpt_dir": "--ckpt-dir",
    "lora_dir": "--lora-dir",
}
# `--webui-dir` means "A1111 layout under this folder" to the sidecar (bridge/config.ts webuiLayout)
A1111_LAYOUT = {
    "embeddings_dir": ("embeddings",),
    "hypernetwork_dir": ("models", "hypernetworks"),
    "ckpt_dir": ("models", "Stable-diffusion"),
    "lora_dir": ("models", "Lora"),
}

# Processes this extension started, by sidecar URL. Module state in the `sidetrain_ext` package
# survives the webui's "Reload UI" (which re-runs scripts/, not packages already imported).
started: dict = {}


def health(settings: Settings, timeout: float = 2.0) -> Optional[dict]:
    """The sidecar's `/api/health` body, or None when nothing (or not sidetrain) answers."""
    request = urllib.request.Request(settings.url + "/api/health")
    if settings.token:
        request.add_header("Authorization", f"Bearer {settings.token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
    except Exception:
        return None
    return body if isinstance(body, dict) and body.get("name") == "sidetrain" else None


def _program(settings: Settings) -> list:
    if settings.folder:
        node, script = shutil.which("node"), os.path.join(settings.folder, "bin", "sidetrain.mjs")
        if not node or not os.path.isfile(script):
            raise FileNotFoundError(f"sidetrain folder '{settings.folder}': need `node` on PATH and "
                                    f"{script} (a sidetrain checkout with `npm install` done)")
        return [node, script]
    installed = shutil.which("sidetrain")
    if installed:
        return [installed]
    npx = shutil.which("npx")
    if not npx:
        raise FileNotFoundError("neither `sidetrain` nor `npx` is on PATH: install Node.js 20 and "
                                "sidetrain, or set Settings → sidetrain → sidetrain folder")
    return [npx, "--no-install", "sidetrain"]


def supported_flags(program: list) -> set:
    """The options `sidetrain serve --help` lists (empty if it cannot be run)."""
    try:
        result = subprocess.run(program + ["serve", "--help"], capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"--[a-z][a-z0-9-]*", result.stdout))


def _is_a1111_layout(folders: dict) -> bool:
    root = folders.get("webui_dir", "")
    return all(os.path.normpath(folders.get(key, "")) == os.path.join(root, *parts)
               for key, parts in A1111_LAYOUT.items())


def build_command(settings: Settings, folders: dict, webui: str, supported=None) -> list:
    """The argv of `sidetrain serve` for this webui. `supported`: the flags serve accepts (None = all).
    Folders go as explicit flags where serve has them; `--webui-dir` only when it describes them
    exactly (A1111/Forge default layout) or they are all explicit, since it disables the sidecar's
    own discovery through `--webui-url` (the webui's /sdapi/v1/cmd-flags)."""
    accepts = (lambda flag: True) if supported is None else (lambda flag: flag in supported)
    parts = urlsplit(settings.url)
    command = _program(settings) + ["serve", "--host", parts.hostname or "127.0.0.1",
                                    "--port", str(parts.port or 7862)]
    if webui and accepts("--webui-url"):
        command += ["--webui-url", webui]
    explicit = [(flag, folders[key]) for key, flag in FOLDER_FLAGS.items() if folders.get(key) and accepts(flag)]
    if folders.get("webui_dir") and accepts("--webui-dir") and (
            len(explicit) == len(FOLDER_FLAGS) or _is_a1111_layout(folders)):
        command += ["--webui-dir", folders["webui_dir"]]
    for flag, folder in explicit:
        command += [flag, folder]
    return command


def _log_file():
    try:
        return open(LOG_PATH, "ab")
    except OSError:  # a read-only extensions folder: the webui's console gets the output instead
        return None


def _spawn(settings: Settings) -> subprocess.Popen:
    command = build_command(settings, resolve_folders(), webui_url(), supported_flags(_program(settings)))
    env = dict(os.environ, **({"SIDETRAIN_TOKEN": settings.token} if settings.token else {}))
    auth = webui_api_auth()
    if auth:
        env["SIDETRAIN_WEBUI_AUTH"] = auth
    output = _log_file()
    try:
        process = subprocess.Popen(command, cwd=settings.folder or None, env=env, stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT if output else None)
    finally:
        if output:
            output.close()  # the child has its own copy
    log.info("sidetrain: started %s", " ".join(command))
    return process


def start(settings: Optional[Settings] = None, wait: float = 60.0) -> str:
    """Start the sidecar unless one answers; wait until it does. Returns what happened, for the log."""
    settings = settings or read_settings()
    if health(settings):
        return f"sidetrain: sidecar already running at {settings.url}"
    process = started.get(settings.url)
    if process is None or process.poll() is not None:
        process = started[settings.url] = _spawn(settings)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if health(settings):
            return f"sidetrain: sidecar up at {settings.url} (pid {process.pid})"
        if process.poll() is not None:
            return f"sidetrain: sidecar exited with code {process.returncode}; see {LOG_PATH}"
        time.sleep(0.5)
    return f"sidetrain: sidecar not answering at {settings.url} after {wait:.0f}s; see {LOG_PATH}"


def autostart_in_background() -> Optional[threading.Thread]:
    """If the setting is on, start the sidecar in a thread (the webui's startup does not wait)."""
    settings = read_settings()
    if not settings.autostart:
        return None

    def run():
        try:
            print(start(settings), flush=True)  # the webui's console is where users look
        except Exception as err:  # never break the webui's startup
            print(f"sidetrain: could not start the sidecar: {err}", flush=True)

    thread = threading.Thread(target=run, name="sidetrain-autostart", daemon=True)
    thread.start()
    return thread


def stop_started() -> None:
    """Stop the sidecars this extension started (not one the user started)."""
    for url, process in list(started.items()):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        started.pop(url, None)


atexit.register(stop_started)
