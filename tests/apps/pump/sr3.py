"""Real sr3 (MetPX-Sarracenia 3.x) for the interop tests: find it, configure it, run it.

sr3 lives in a venv of its own, C{var/bench/sr3venv} under the project (the one bench/pump.py
makes; C{.ci/run} makes it in CI with C{pip install metpx-sr3[amqp]}). Without it the interop
tests skip, saying how to get it, or fail when C{CI} is set; over MQTT sr3 also needs
paho-mqtt (C{metpx-sr3[amqp,mqtt]}). Each L{Sr3} gets a HOME of its own, so its configs,
credentials, state and logs stay in the test's temp dir.
"""

import glob
import os
import pwd
import signal
import subprocess
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SR3 = os.path.join(ROOT, "var", "bench", "sr3venv", "bin", "sr3")


def _sr3_imports(module):
    """Whether sr3's python imports C{module}."""
    return subprocess.run(
        [os.path.join(os.path.dirname(SR3), "python"), "-c", f"import {module}"],
        capture_output=True, stdin=subprocess.DEVNULL, timeout=60,
    ).returncode == 0


def sr3_missing(mqtt=False, reassemble=False):
    """Why sr3 cannot run here (with C{mqtt}, over MQTT; with C{reassemble}, putting files
    announced in blocks together), saying how to get it; None if it can."""
    make = (
        "make it with: python3 -m venv var/bench/sr3venv && "
        "var/bench/sr3venv/bin/pip install 'metpx-sr3[amqp,mqtt,reassemble]'"
    )
    if not os.access(SR3, os.X_OK):
        return f"sr3 is not installed at {SR3}; {make}"
    if mqtt and not _sr3_imports("paho.mqtt.client"):
        return f"sr3 at {SR3} lacks paho-mqtt for MQTT; {make}"
    if reassemble and not _sr3_imports("flufl.lock"):
        return f"sr3 at {SR3} lacks flufl.lock for its block_reassembly; {make}"
    return None


def skip_or_fail_without_sr3(mqtt=False, reassemble=False):
    """Skip (fail under CI) without sr3, or with C{mqtt} without its paho-mqtt, or with
    C{reassemble} without its flufl.lock."""
    reason = sr3_missing(mqtt, reassemble)
    if reason is None:
        return
    if os.environ.get("CI"):
        raise AssertionError(f"CI is set and {reason}")
    raise unittest.SkipTest(reason)


# sr3 3.3.1's MQTT publisher calls copy.copy without importing copy (sarracenia/moth/mqtt.py,
# putNewMessage): every post over MQTT fails with a NameError. The sitecustomize there makes
# the module a builtin in sr3's processes; nothing else of sr3 is changed.
SR3_FIXES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sr3_fixes")


class Sr3:
    """One sr3 component configuration run in the foreground as a child process, on the
    private RabbitMQ node (as guest) or, with C{scheme} C{mqtt}, on the private Mosquitto
    (as anonymous)."""

    def __init__(self, home, broker, scheme="amqp"):
        self.home = home
        self.broker = broker
        self.scheme = scheme
        self.user = "guest" if scheme == "amqp" else "anonymous"
        self.config_dir = os.path.join(home, ".config", "sr3")
        os.makedirs(self.config_dir, exist_ok=True)
        credentials = os.path.join(self.config_dir, "credentials.conf")
        with open(credentials, "w") as f:
            f.write(f"{scheme}://{self.user}:{self.user}@{broker.host}:{broker.port}/\n")
        os.chmod(credentials, 0o600)
        self.env = dict(os.environ, HOME=home, USER=pwd.getpwuid(os.getuid()).pw_name)
        self.env.pop("VIRTUAL_ENV", None)
        if scheme == "mqtt":
            self.env["PYTHONPATH"] = SR3_FIXES
        self.procs = []

    def configure(self, component, name, lines):
        """Write C{component}/C{name}.conf: the broker line, then C{lines}."""
        directory = os.path.join(self.config_dir, component)
        os.makedirs(directory, exist_ok=True)
        os.makedirs(os.path.join(self.home, ".cache", "sr3", component, name), exist_ok=True)
        broker = f"{self.scheme}://{self.user}@{self.broker.host}:{self.broker.port}/"
        key = "post_broker" if component in ("watch", "post") else "broker"
        with open(os.path.join(directory, f"{name}.conf"), "w") as f:
            f.write("\n".join([f"{key} {broker}", *lines, ""]))
        return f"{component}/{name}"

    def run(self, *words, timeout=60):
        """Run C{sr3 WORDS} to its end: the CompletedProcess."""
        return subprocess.run([SR3, *words], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def foreground(self, config):
        """Start C{sr3 foreground CONFIG}; stopped by L{stop}. Over MQTT it runs as instance 1
        (C{--no 1}): an sr3 subscriber in the foreground as instance 0 only declares its
        sessions, over and over, and never consumes."""
        log = open(os.path.join(self.home, config.replace("/", "_") + ".out"), "w")
        instance = ["--no", "1"] if self.scheme == "mqtt" else []
        proc = subprocess.Popen([SR3, *instance, "foreground", config], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def output(self):
        """What the foreground runs and sr3's logs said (for failure messages)."""
        text = []
        for path in glob.glob(os.path.join(self.home, "*.out")) + glob.glob(
            os.path.join(self.home, ".cache", "sr3", "log", "*.log")
        ):
            with open(path, errors="replace") as f:
                text.append(f"== {path}\n" + "".join(f.readlines()[-30:]))
        return "\n".join(text)

    def stop(self):
        for proc, log in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()
        self.procs.clear()
