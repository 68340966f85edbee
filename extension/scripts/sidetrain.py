"""sidetrain's webui extension: registers its callbacks; the code is in `sidetrain_ext/`.

The webui puts the extension folder on sys.path while it loads this file (modules/scripts.py
`load_scripts`); it is added here as well for webuis that do not.
"""

import os
import sys

_EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXTENSION_DIR not in sys.path:
    sys.path.insert(0, _EXTENSION_DIR)

from modules import script_callbacks  # noqa: E402

from sidetrain_ext import launcher, routes, ui  # noqa: E402


def on_app_started(demo, app):
    routes.mount(app)
    launcher.autostart_in_background()


script_callbacks.on_ui_tabs(ui.tabs)
if hasattr(script_callbacks, "on_ui_train_tabs"):
    script_callbacks.on_ui_train_tabs(ui.train_tab)
script_callbacks.on_ui_settings(ui.settings)
script_callbacks.on_app_started(on_app_started)
