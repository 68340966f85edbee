"""sidetrain's webui extension: a tab that shows the sidecar's training page, and the routes behind it.

Modules (each imports the webui's own modules lazily, so every one of them can be tested with
stand-ins and none fails to import outside a webui):

- `config`   — settings, command-line flags, and the webui's folders (A1111/Forge vs SD.Next shapes)
- `proxy`    — `/sidetrain/...` → the sidecar, HTTP (streamed) and WebSocket; Host/Origin rewriting
- `routes`   — puts the proxy and `POST /sidetrain/refresh-hypernetworks` on the webui's FastAPI app
- `webui`    — calls into the webui: its hypernetwork reload function, its login cookie check
- `launcher` — starts `sidetrain serve` with the webui's folders when none is running
- `ui`       — the top-level tab, the Train sub-tab and the settings section
"""

DEFAULT_URL = "http://127.0.0.1:7862"
PREFIX = "/sidetrain"
