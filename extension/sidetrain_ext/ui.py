"""The tab, the Train sub-tab and the settings section.

Only the plainest gradio is used (`gr.Blocks`, `gr.HTML`, `gr.Tab`), which A1111 (gradio 3.41),
Forge (gradio 4) and SD.Next build the same way. The page itself is the sidecar's, shown in an
iframe through the proxy on the webui's own origin, so it works wherever the webui is opened.
"""

from . import DEFAULT_URL, PREFIX

SECTION = ("sidetrain", "sidetrain")


def iframe_html(height: str = "calc(100vh - 140px)") -> str:
    # A relative src: resolves against the webui page's own URL, so it also works under a
    # reverse-proxy prefix. clipboard-write: the page's "copy prompt" buttons.
    src = PREFIX.lstrip("/") + "/"
    return (f'<iframe src="{src}" title="sidetrain" allow="clipboard-write" '
            f'style="width:100%;height:{height};min-height:640px;border:0"></iframe>')


def tabs():
    """`on_ui_tabs`: a top-level **sidetrain** tab."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as block:
        gr.HTML(iframe_html(), elem_id="sidetrain_page")
    return [(block, "sidetrain", "sidetrain")]


def train_tab(params=None):
    """`on_ui_train_tabs` (A1111 only: Forge has no Train tab, SD.Next no such callback)."""
    import gradio as gr

    with gr.Tab("sidetrain", elem_id="sidetrain_train_tab"):
        gr.HTML(iframe_html(), elem_id="sidetrain_train_page")


def _option(shared, default, label, component=None, component_args=None, restrict_api=False):
    try:
        return shared.OptionInfo(default, label, component, component_args, section=SECTION,
                                 restrict_api=restrict_api)
    except TypeError:  # A1111 < 1.6 and SD.Next: no restrict_api
        return shared.OptionInfo(default, label, component, component_args, section=SECTION)


def settings():
    """`on_ui_settings`: Settings → sidetrain. Command-line flags (preload.py) win over these."""
    import gradio as gr
    from modules import shared

    options = {
        "sidetrain_url": _option(shared, DEFAULT_URL, "Sidecar URL (the tab reaches it through the webui at /sidetrain/)"),
        # restrict_api: not readable through /sdapi/v1/options
        "sidetrain_token": _option(shared, "", "Sidecar token (SIDETRAIN_TOKEN; added by the webui, never sent to the browser)",
                                   gr.Textbox, {"type": "password"}, restrict_api=True),
        "sidetrain_autostart": _option(shared, False, "Start the sidecar with the webui when none is running"),
        "sidetrain_folder": _option(shared, "", "sidetrain folder for autostart (a checkout; empty: `sidetrain` or `npx sidetrain` from PATH)"),
    }
    for key, info in options.items():
        shared.opts.add_option(key, info)
