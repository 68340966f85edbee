"""Stand-in for modules/script_callbacks.py: records what an extension registers."""
callbacks = {"ui_tabs": [], "ui_train_tabs": [], "ui_settings": [], "app_started": []}


def clear():
    for registered in callbacks.values():
        registered.clear()


def on_ui_tabs(callback):
    callbacks["ui_tabs"].append(callback)


def on_ui_train_tabs(callback):
    callbacks["ui_train_tabs"].append(callback)


def on_ui_settings(callback):
    callbacks["ui_settings"].append(callback)


def on_app_started(callback):
    callbacks["app_started"].append(callback)
