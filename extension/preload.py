"""Command-line flags of the sidetrain extension.

The webui calls `preload(parser)` for every extension before it parses its own command line
(A1111/Forge `modules/launch_utils.py`, SD.Next `modules/cmd_args.py`). A flag given here wins
over the same value in Settings → sidetrain.
"""


def preload(parser):
    parser.add_argument("--sidetrain-url", type=str, default=None,
                        help="sidetrain: URL of the sidecar (default: the setting, http://127.0.0.1:7862)")
    parser.add_argument("--sidetrain-token", type=str, default=None,
                        help="sidetrain: bearer token the sidecar requires (SIDETRAIN_TOKEN)")
    parser.add_argument("--sidetrain-autostart", action="store_true", default=None,
                        help="sidetrain: start the sidecar with the webui when none is running")
