"""A private Mosquitto broker for the MQTT tests: own port, config and persistence directory.

`get_mosquitto()` hands every test of a trial worker the same broker, started on first use;
tests may stop (SIGTERM: Mosquitto saves its sessions and queued messages) and start it again.
Where the `mosquitto` binary is missing the tests skip, or fail when `CI` is set.
"""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

BINARY = "/usr/sbin/mosquitto"


MISSING = "mosquitto is not installed (apt-get install mosquitto)"


def find_mosquitto():
    """Path of the `mosquitto` binary, or None when Mosquitto is not installed."""
    return BINARY if os.access(BINARY, os.X_OK) else shutil.which("mosquitto")


def skip_or_fail_without_mosquitto():
    if find_mosquitto():
        return
    reason = f"{MISSING} to run the MQTT tests"
    if os.environ.get("CI"):
        raise AssertionError(f"CI is set and {reason}")
    raise unittest.SkipTest(reason)


class PrivateMosquitto:
    """One Mosquitto process on a free loopback port, its state under a temporary directory."""

    host = "127.0.0.1"

    def __init__(self):
        self.binary = find_mosquitto()
        if self.binary is None:
            raise RuntimeError(MISSING)
        self.base = tempfile.mkdtemp(prefix="ion-mosquitto-")
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
        self.config = os.path.join(self.base, "mosquitto.conf")
        with open(self.config, "w") as f:
            f.write(
                f"listener {self.port} {self.host}\n"
                "allow_anonymous true\n"
                "persistence true\n"
                f"persistence_location {self.base}/\n"
                "max_queued_messages 100000\n"
                "max_inflight_messages 100\n"
                f"log_dest file {self.base}/mosquitto.log\n"
                # As root it would switch to user mosquitto, who cannot write here.
                + ("user root\n" if os.geteuid() == 0 else "")
            )
        self.process = None

    @property
    def url(self):
        return f"mqtt://{self.host}:{self.port}/"

    def start(self, timeout=10.0):
        self.process = subprocess.Popen(
            [self.binary, "-c", self.config],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}; see {self.base}")

    def stop(self, sig=signal.SIGTERM):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)
        self.process = None

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


_shared = None


def get_mosquitto():
    """The worker's broker, started on first use (and again if a test left it stopped)."""
    global _shared
    skip_or_fail_without_mosquitto()
    if _shared is None:
        _shared = PrivateMosquitto()
        atexit.register(_shared.cleanup)
    if _shared.process is None:
        _shared.start()
    return _shared
