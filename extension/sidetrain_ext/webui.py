"""Calls into the running webui: its hypernetwork list and its login.

Hypernetworks: the webui lists them once at start and has no API route to list them again (it has
`/sdapi/v1/refresh-embeddings`, `-checkpoints`, `-loras`, but nothing for hypernetworks), so a
freshly trained one is unknown to `<hypernet:name:1>` until a restart. The reload function lives in
different places:
- A1111 ≥ 1.6 and Forge: `modules.shared_items.reload_hypernetworks()`
  (`shared.hypernetworks = hypernetwork.list_hypernetworks(cmd_opts.hypernetwork_dir)`);
- A1111 < 1.6 and SD.Next: `modules.shared.reload_hypernetworks()` (SD.Next reads
  `opts.hypernetwork_dir`);
- otherwise, if `modules.hypernetworks.hypernetwork.list_hypernetworks` exists, the same
  assignment is done here with the folder from `config.resolve_folders()`.

Login: with `--gradio-auth` the webui's pages need gradio's login cookie, but routes an extension
adds to the app are not covered by it. `authorized_by_gradio(app)` applies the same check gradio's
routes do (`app.tokens[cookie "access-token…"]`, gradio 3.41 and 4), and refuses when the webui
has a login but the check cannot be made.
"""

import logging

from .config import resolve_folders

log = logging.getLogger("sidetrain")


def _import(name):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def find_reload_function():
    """The webui's hypernetwork reload function, or None if this webui has no hypernetworks."""
    for module_name in ("modules.shared_items", "modules.shared"):
        function = getattr(_import(module_name), "reload_hypernetworks", None)
        if callable(function):
            return function
    hypernetwork = _import("modules.hypernetworks.hypernetwork")
    shared = _import("modules.shared")
    if shared is None or not callable(getattr(hypernetwork, "list_hypernetworks", None)):
        return None

    def reload_from_folder():
        shared.hypernetworks = hypernetwork.list_hypernetworks(resolve_folders()["hypernetwork_dir"])

    return reload_from_folder


def reload_hypernetworks() -> list:
    """Reload the webui's hypernetwork list; returns the names it now knows (for the sidecar to
    check that its new file is there). Raises LookupError on a webui without hypernetworks."""
    function = find_reload_function()
    if function is None:
        raise LookupError("this webui has no hypernetwork list to reload")
    function()
    names = getattr(_import("modules.shared"), "hypernetworks", None) or {}
    return sorted(names)


def authorized_by_gradio(app):
    """A check `conn -> bool` for requests to the extension's routes: True when the webui has no
    login, else only with a valid gradio login cookie."""

    def authorized(conn) -> bool:
        if not getattr(app, "auth", None):
            return True
        tokens = getattr(app, "tokens", None)
        if not isinstance(tokens, dict):
            log.warning("sidetrain: the webui has a login but its tokens are not readable; refusing")
            return False
        return any(name.startswith("access-token") and value in tokens
                   for name, value in conn.cookies.items())

    return authorized
