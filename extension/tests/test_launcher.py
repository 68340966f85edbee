"""Autostart: the health check, the `sidetrain serve` command line, and a real start of a sidecar
executable (the fake one, put on PATH as `sidetrain`) that is then stopped again."""

import json
import os
import stat
import sys
import tempfile
import unittest
from unittest import mock

import support  # noqa: F401  (import paths)
from fake_sidecar import make_app
from support import TESTS_DIR, ServerThread, free_port, make_webui
from modules import shared

from sidetrain_ext import launcher
from sidetrain_ext.config import Settings


def settings(port, token="", folder=""):
    return Settings(url=f"http://127.0.0.1:{port}", token=token, autostart=True, folder=folder)


def executable(folder, name, text):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


class LauncherTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = os.path.join(self.tmp.name, "webui")
        self.folders = make_webui(self.root)
        self.bin = os.path.join(self.tmp.name, "bin")
        os.makedirs(self.bin)
        patcher = mock.patch.object(launcher, "LOG_PATH", os.path.join(self.tmp.name, "sidecar.log"))
        patcher.start()
        self.addCleanup(patcher.stop)

    def tearDown(self):
        launcher.stop_started()
        self.tmp.cleanup()

    def test_health(self):
        port = free_port()
        self.assertIsNone(launcher.health(settings(port)))
        with ServerThread(make_app(port, "tok"), port):
            self.assertEqual(launcher.health(settings(port, "tok"))["name"], "sidetrain")
            self.assertIsNone(launcher.health(settings(port, "wrong")))

    def test_command_passes_the_webuis_folders(self):
        checkout = os.path.join(self.tmp.name, "sidetrain")
        os.makedirs(os.path.join(checkout, "bin"))
        open(os.path.join(checkout, "bin", "sidetrain.mjs"), "w").close()
        command = launcher.build_command(settings(7870, folder=checkout), self.folders, "http://127.0.0.1:7860")
        self.assertTrue(command[0].endswith("node"))
        self.assertEqual(command[1:], [
            os.path.join(checkout, "bin", "sidetrain.mjs"), "serve", "--host", "127.0.0.1", "--port", "7870",
            "--webui-url", "http://127.0.0.1:7860", "--webui-dir", self.root,
            "--embeddings-dir", self.folders["embeddings_dir"], "--hypernetwork-dir", self.folders["hypernetwork_dir"],
            "--ckpt-dir", self.folders["ckpt_dir"], "--lora-dir", self.folders["lora_dir"]])

    def test_only_flags_serve_accepts(self):
        """Today's `serve` has no per-folder flags: `--webui-dir` only where it means the same folders."""
        serve = {"--host", "--port", "--webui-url", "--webui-dir"}
        with mock.patch.dict(os.environ, {"PATH": self.bin}):
            executable(self.bin, "sidetrain", "#!/bin/sh\n")
            a1111 = launcher.build_command(settings(7862), self.folders, "http://127.0.0.1:7860", serve)
            self.assertEqual(a1111[-4:], ["--webui-url", "http://127.0.0.1:7860", "--webui-dir", self.root])
            sdnext = make_webui(self.root, "sdnext")  # embeddings in models/embeddings: not A1111's layout
            command = launcher.build_command(settings(7862), sdnext, "http://127.0.0.1:7860", serve)
            self.assertEqual(command[-2:], ["--webui-url", "http://127.0.0.1:7860"])
            self.assertNotIn("--webui-dir", command)

    def test_program_found_on_path(self):
        with mock.patch.dict(os.environ, {"PATH": self.bin}):
            with self.assertRaises(FileNotFoundError) as caught:
                launcher.build_command(settings(7862), self.folders, "")
            self.assertIn("npx", str(caught.exception))
            npx = executable(self.bin, "npx", "#!/bin/sh\n")
            self.assertEqual(launcher.build_command(settings(7862), {}, "")[:4], [npx, "--no-install", "sidetrain", "serve"])
            installed = executable(self.bin, "sidetrain", "#!/bin/sh\n")
            self.assertEqual(launcher.build_command(settings(7862), {}, "")[:2], [installed, "serve"])
        with self.assertRaises(FileNotFoundError):
            launcher.build_command(settings(7862, folder=os.path.join(self.tmp.name, "nowhere")), {}, "")

    def test_autostart_starts_once_and_stops_what_it_started(self):
        record = os.path.join(self.tmp.name, "args.json")
        executable(self.bin, "sidetrain", f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {TESTS_DIR!r})\n"
                                          "from fake_sidecar import main\nmain(sys.argv[1:])\n")
        env = {"PATH": self.bin + os.pathsep + os.environ["PATH"], "FAKE_SIDECAR_ARGS": record}
        wanted = settings(free_port(), token="tok")
        shared.cmd_opts.api_auth = "me:s3cret,other:pw"  # the webui runs with --api-auth
        with mock.patch.dict(os.environ, env):
            message = launcher.start(wanted, wait=30)
            if "sidecar up" not in message:
                with open(launcher.LOG_PATH) as log:
                    self.fail(message + "\n" + log.read())
            process = launcher.started[wanted.url]
            self.assertIn("already running", launcher.start(wanted))
            self.assertIs(launcher.started[wanted.url], process)
        with open(record) as f:
            recorded = json.load(f)
        self.assertEqual(recorded["token"], "tok")  # in the environment...
        self.assertNotIn("tok", recorded["argv"])  # ...not on the command line
        self.assertEqual(recorded["webui_auth"], "me:s3cret")  # the webui's API credentials too...
        self.assertFalse(any("s3cret" in a for a in recorded["argv"]))  # ...never in argv
        argv = recorded["argv"]
        self.assertEqual(argv[argv.index("--hypernetwork-dir") + 1], self.folders["hypernetwork_dir"])
        launcher.stop_started()
        self.assertIsNotNone(process.poll())
        self.assertIsNone(launcher.health(wanted))

    def test_the_webuis_api_credentials(self):
        from sidetrain_ext.config import webui_api_auth
        self.assertEqual(webui_api_auth(), "")  # no --api-auth: none
        shared.cmd_opts.api_auth = "a:b:c, d:e"  # A1111/Forge --api-auth: the first pair, colons kept
        self.assertEqual(webui_api_auth(), "a:b:c")
        make_webui(self.root, "sdnext")
        shared.cmd_opts.auth = "next:pw"  # SD.Next --auth
        self.assertEqual(webui_api_auth(), "next:pw")

    def test_autostart_off_does_nothing(self):
        self.assertIsNone(launcher.autostart_in_background())


if __name__ == "__main__":
    unittest.main()
