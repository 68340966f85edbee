"""What `sidetrain install-extension` records beside the extension (sidecar.json: the clone and
autostart on) is read as the default settings; a setting the user saved wins over it; and the
message for a missing sidecar says what to run for this webui. When the suite runs from an installed
copy (SIDETRAIN_INSTALLED_WEBUI = the webui folder), the copy's own sidecar.json is checked too."""

import json
import os
import tempfile
import unittest
from unittest import mock

import support  # noqa: F401  (import paths)
from modules import shared
from support import EXTENSION_DIR, make_webui

from sidetrain_ext import DEFAULT_URL, config


class InstalledTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = os.path.join(self.tmp.name, "webui")
        make_webui(self.root)
        self.file = os.path.join(self.tmp.name, "sidecar.json")
        patcher = mock.patch.object(config, "INSTALLED_FILE", self.file)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.addCleanup(self.tmp.cleanup)

    def write(self, data):
        with open(self.file, "w") as f:
            json.dump(data, f)

    def test_nothing_recorded_gives_the_plain_defaults(self):
        self.assertEqual(config.read_settings(), config.Settings(DEFAULT_URL, "", False, ""))
        self.assertIn(f"npx sidetrain install-extension --webui-dir {self.root}", config.start_command(config.read_settings()))

    def test_recorded_clone_and_autostart_are_the_defaults(self):
        self.write({"folder": "/opt/sidetrain", "autostart": True})
        self.assertEqual(config.read_settings(), config.Settings(DEFAULT_URL, "", True, "/opt/sidetrain"))
        self.assertEqual(config.start_command(config.read_settings()), f"cd /opt/sidetrain && npx sidetrain serve --webui-dir {self.root}")

    def test_a_saved_setting_wins_over_the_record(self):
        self.write({"folder": "/opt/sidetrain", "autostart": True})
        shared.opts.sidetrain_autostart = False
        shared.opts.sidetrain_folder = "/srv/other"
        self.assertEqual(config.read_settings(), config.Settings(DEFAULT_URL, "", False, "/srv/other"))

    def test_a_broken_record_is_ignored(self):
        with open(self.file, "w") as f:
            f.write("{not json")
        self.assertEqual(config.read_settings().folder, "")


@unittest.skipUnless(os.environ.get("SIDETRAIN_INSTALLED_WEBUI"), "runs from an installed copy only")
class InstalledCopyTest(unittest.TestCase):
    def test_this_copy_sits_in_the_webui_and_records_a_clone_with_the_cli(self):
        webui = os.path.realpath(os.environ["SIDETRAIN_INSTALLED_WEBUI"])
        self.assertEqual(os.path.realpath(os.path.dirname(EXTENSION_DIR)), os.path.join(webui, "extensions"))
        with mock.patch.object(config, "INSTALLED_FILE", support.INSTALLED_FILE):
            recorded = config.installed()
        self.assertIs(recorded.get("autostart"), True)
        self.assertTrue(os.path.isfile(os.path.join(recorded["folder"], "bin", "sidetrain.mjs")), recorded)


if __name__ == "__main__":
    unittest.main()
