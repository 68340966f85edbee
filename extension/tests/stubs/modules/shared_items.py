"""Stand-in for modules/shared_items.py (A1111 1.6+, Forge): reload_hypernetworks."""
calls = []


def reload_hypernetworks():
    from modules.hypernetworks import hypernetwork
    from modules import shared

    calls.append("shared_items")
    shared.hypernetworks = hypernetwork.list_hypernetworks(shared.cmd_opts.hypernetwork_dir)
