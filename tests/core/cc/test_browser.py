"""The web console in a real browser: headless Chromium (Debian's `chromium`, which .ci/run
installs) loads the pages of a running pump and the test reads the DOM its script rendered."""

import os
import re
import shutil
import subprocess
import tempfile

from twisted.internet import threads
from twisted.trial import unittest

from tests.core.cc.console import RunningPump

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(url, *extra, timeout=60):
    """Run headless Chromium on C{url} with a fresh profile; its stdout (the DOM with
    C{--dump-dom}). The virtual time budget lets the page's script fetch and render."""
    with tempfile.TemporaryDirectory(prefix="ion-chromium-") as profile:
        result = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=3000",
             *extra, url],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise AssertionError(f"chromium exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def dump_dom(url):
    return chromium(url, "--dump-dom")


class BrowserTests(unittest.TestCase):
    def setUp(self):
        if CHROMIUM is None:
            if os.environ.get("CI"):
                self.fail("chromium is missing (.ci/run installs it with apt-get)")
            raise unittest.SkipTest("chromium is not installed (apt-get install chromium)")

    async def test_pages_render_live_data(self):
        """The pump page shows the files delivered, and more after more files arrive; the
        overview shows the supervision tree with each process's state; the conversations page
        lists the observer's conversations."""
        pump = await RunningPump().start(self, apps=["observer"])
        await pump.deliver("a.txt", "b.txt")
        dom = await threads.deferToThread(dump_dom, pump.url + "/pump")
        self.assertRegex(dom, r'<span id="delivered">2</span>')
        self.assertIn("pump.consumer.sub", dom)
        self.assertIn('<td class="">201</td><td class="num">2</td>', dom)
        await pump.deliver("c.txt", "d.txt", "e.txt")
        dom = await threads.deferToThread(dump_dom, pump.url + "/pump")
        self.assertRegex(dom, r'<span id="delivered">5</span>')
        dom = await threads.deferToThread(dump_dom, pump.url + "/")
        tree = re.search(r'<table id="tree">(.*?)</table>', dom, re.S).group(1)
        for name in ("pump-sup", "pump.consumer.sub", "pump.poll.src", "pump.report_router"):
            self.assertRegex(tree, rf'class="proc"[^>]*>{re.escape(name)}</span>.*?'
                             r'<span class="ACTIVE">ACTIVE</span>')
        # The children are indented under their supervisor.
        self.assertIn('padding-left: 16px;">pump.consumer.sub<', tree)
        self.assertIn(pump.c.id, dom)
        dom = await threads.deferToThread(dump_dom, pump.url + "/conversations")
        self.assertRegex(dom, r'<table id="observed">.*<td class="">stats</td>')
