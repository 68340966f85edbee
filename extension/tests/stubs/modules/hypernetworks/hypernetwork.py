"""Stand-in for modules/hypernetworks/hypernetwork.py: `list_hypernetworks` as A1111 has it
(every *.pt below the folder, by file stem)."""
import glob
import os


def list_hypernetworks(path):
    res = {}
    for filename in sorted(glob.iglob(os.path.join(path, "**/*.pt"), recursive=True)):
        res[os.path.splitext(os.path.basename(filename))[0]] = filename
    return res
