"""Running the real command (`twistd --pidfile= -n cc ...`) for a while, as a user does."""

import os
import signal
import subprocess
import threading
import time

from tests.core.cc.test_tap import ROOT, TWISTD


def run_for(seconds, *args, cwd=None, until=None, timeout=30):
    """Run `twistd --pidfile= -n cc args...` for C{seconds} (and until a line contains
    C{until}, within C{timeout}), stop it with SIGTERM and return its output (stdout and
    stderr together)."""
    cmd = [*TWISTD, "--pidfile=", "-n", "cc", *args]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < timeout:
        seen = until is None or any(until in line for line in list(lines))
        if seen and time.monotonic() - start >= seconds:
            break
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    reader.join(timeout=10)
    return "".join(lines)
