"""Settings, command-line flags and the webui's folders, read at run time.

The three webuis keep the same facts in different places:
- A1111 and Forge: folders are command-line flags (`shared.cmd_opts.embeddings_dir`,
  `hypernetwork_dir`, `ckpt_dir` (None = `models/Stable-diffusion`), `lora_dir` (added by the
  built-in Lora extension's preload)); `modules.paths` has `script_path`, `data_path`, `models_path`.
- SD.Next: folders are settings (`shared.opts.embeddings_dir`, ... — see its `modules/shared.py`
  "system-paths" section), `cmd_opts` has none of them.
So each folder is looked up in `opts` first, then `cmd_opts`, then the webui's default location.
Everything is read on each call (never cached) so a changed setting takes effect at once.
"""

import json
import os
from dataclasses import dataclass

from . import DEFAULT_URL

# The setting keys in the webui's config.json; the command-line flags of preload.py are the same
# names on `cmd_opts` (argparse turns `--sidetrain-url` into `sidetrain_url`).
KEY_URL = "sidetrain_url"
KEY_TOKEN = "sidetrain_token"
KEY_AUTOSTART = "sidetrain_autostart"
KEY_FOLDER = "sidetrain_folder"

# folder key → (where the webui puts it by default, sub-folder); see the module docstring.
FOLDER_DEFAULTS = {
    "embeddings_dir": ("data_path", "embeddings"),
    "hypernetwork_dir": ("models_path", "hypernetworks"),
    "ckpt_dir": ("models_path", "Stable-diffusion"),
    "lora_dir": ("models_path", "Lora"),
}


@dataclass
class Settings:
    url: str  # the sidecar's base URL, e.g. http://127.0.0.1:7862 (no trailing slash)
    token: str  # bearer token the sidecar requires; "" = none
    autostart: bool  # start `sidetrain serve` with the webui when none answers /api/health
    folder: str  # a sidetrain checkout to run from; "" = `npx sidetrain` found on PATH


def _shared():
    try:
        from modules import shared
        return shared
    except ImportError:
        return None


def _paths():
    try:
        from modules import paths
        return paths
    except ImportError:
        return None


def _get(obj, key):
    """An attribute of `opts`/`cmd_opts`, or None; webui Options raise AttributeError for unknown keys."""
    if obj is None:
        return None
    try:
        return getattr(obj, key, None)
    except Exception:  # some Options implementations raise other errors for missing keys
        return None


def _first_text(*values):
    for value in values:
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


# Written by `sidetrain install-extension` beside the extension: {"folder": the clone, "autostart": true}.
INSTALLED_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sidecar.json")


def installed() -> dict:
    """What `sidetrain install-extension` recorded ({} when the extension was put here by hand)."""
    try:
        with open(INSTALLED_FILE, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _saved(opts, key) -> bool:
    """Whether the user saved this setting (the webui keeps saved values in `opts.data`)."""
    data = _get(opts, "data")
    return isinstance(data, dict) and key in data


def read_settings() -> Settings:
    """The extension's settings: a command-line flag wins over Settings → sidetrain, which wins over env
    and over what `sidetrain install-extension` recorded (the clone's folder, autostart on)."""
    shared = _shared()
    opts, cmd = _get(shared, "opts"), _get(shared, "cmd_opts")
    recorded = installed()
    url = _first_text(_get(cmd, KEY_URL), _get(opts, KEY_URL), os.environ.get("SIDETRAIN_URL"), DEFAULT_URL)
    token = _first_text(_get(cmd, KEY_TOKEN), _get(opts, KEY_TOKEN), os.environ.get("SIDETRAIN_TOKEN"))
    autostart = _get(cmd, KEY_AUTOSTART) is True or _get(opts, KEY_AUTOSTART) is True or (
        not _saved(opts, KEY_AUTOSTART) and recorded.get("autostart") is True)
    folder = _first_text(_get(opts, KEY_FOLDER), recorded.get("folder"))
    return Settings(url=url.rstrip("/"), token=token, autostart=autostart, folder=folder)


def start_command(settings: Settings) -> str:
    """What a person runs to start the sidecar for this webui, for messages: from the known clone, else
    the one-step install that records it."""
    root = webui_root()
    if settings.folder:
        return f"cd {settings.folder} && npx sidetrain serve --webui-dir {root}"
    return (f"in your sidetrain clone, npx sidetrain serve --webui-dir {root}; or once "
            f"npx sidetrain install-extension --webui-dir {root} there, and the webui starts it")


def webui_root() -> str:
    """The webui's install folder (`modules.paths.script_path`), else the working directory."""
    return os.path.abspath(_first_text(_get(_paths(), "script_path")) or os.getcwd())


def _absolute(path: str, root: str) -> str:
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))


def resolve_folders() -> dict:
    """The webui's folders as absolute paths: webui_dir, data_dir, embeddings_dir, hypernetwork_dir,
    ckpt_dir, lora_dir. Relative values are taken relative to the webui root, as the webui does
    (it runs with the root as working directory)."""
    shared, paths = _shared(), _paths()
    opts, cmd = _get(shared, "opts"), _get(shared, "cmd_opts")
    root = webui_root()
    data_dir = _absolute(_first_text(_get(paths, "data_path"), _get(cmd, "data_dir")) or root, root)
    bases = {
        "data_path": data_dir,
        "models_path": _absolute(_first_text(_get(paths, "models_path")) or os.path.join(data_dir, "models"), root),
    }
    folders = {"webui_dir": root, "data_dir": data_dir}
    for key, (base, sub) in FOLDER_DEFAULTS.items():
        value = _first_text(_get(opts, key), _get(cmd, key))
        folders[key] = _absolute(value, root) if value else os.path.join(bases[base], sub)
    return folders


def webui_url() -> str:
    """The webui's own local URL, for the sidecar to call back (refresh routes); from its flags."""
    cmd = _get(_shared(), "cmd_opts")
    port = _get(cmd, "port") or 7860
    scheme = "https" if _get(cmd, "tls_keyfile") and _get(cmd, "tls_certfile") else "http"
    subpath = _first_text(_get(cmd, "subpath")).strip("/")
    return f"{scheme}://127.0.0.1:{port}" + (f"/{subpath}" if subpath else "")


def webui_api_auth() -> str:
    """The `user:pass` the webui's API wants, for the sidecar's calls to it; "" when it wants none.
    A1111 and Forge: `--api-auth` (modules/api/api.py reads `cmd_opts.api_auth`); SD.Next: `--auth`
    (its Api class puts `cmd_opts.auth` on every API route). Both take a comma-separated list of
    pairs; the first one serves."""
    cmd = _get(_shared(), "cmd_opts")
    for key in ("api_auth", "auth"):
        value = _first_text(_get(cmd, key))
        pair = value.split(",")[0].strip()
        if ":" in pair:
            return pair
    return ""
