"""ION installed from a wheel, without a checkout: res/ ships with the package."""

import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import TestCase

from ion.core.app.appfile import AppFileError, find_file
from ion.core.cc.tap import find_res_dir

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
RES = os.path.join(CHECKOUT, "res")
# twistd as its console script runs it, with the interpreter of the venv under test.
_TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


class FindFileTest(TestCase):
    """App and rel files given by name or path are found where an operator expects them."""

    def setUp(self):
        self.cwd = os.getcwd()
        self.empty = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.empty)
        os.chdir(self.empty)
        self.addCleanup(os.chdir, self.cwd)

    def test_a_directory_is_never_taken_for_an_app(self):
        """`twistd -n cc pump` still starts the pump app once the pump made ./pump/."""
        os.mkdir("pump")
        self.assertEqual(find_file("pump", RES, "app"), os.path.join(RES, "apps", "pump.app"))

    def test_readme_path_found_in_shipped_res(self):
        """`res/apps/pump.app` from a directory without res/ names the shipped file."""
        self.assertEqual(
            find_file("res/apps/pump.app", RES, "app"), os.path.join(RES, "apps", "pump.app")
        )
        self.assertEqual(
            find_file("res/deploy/pump-http.rel", RES, "rel"),
            os.path.join(RES, "deploy", "pump-http.rel"),
        )

    def test_local_file_wins(self):
        os.makedirs("res/apps")
        with open("res/apps/pump.app", "w") as f:
            f.write("{}")
        self.assertEqual(find_file("res/apps/pump.app", RES, "app"), "res/apps/pump.app")

    def test_missing_file_names_where_it_looked(self):
        with self.assertRaises(AppFileError) as caught:
            find_file("res/apps/nosuch.app", RES, "app")
        self.assertIn("nosuch", str(caught.exception))
        self.assertIn(os.path.join(RES, "apps", "nosuch.app"), str(caught.exception))

    def test_res_dir_is_the_checkouts_or_the_shipped_one(self):
        """Outside a checkout the config comes from the res/ that ships with ION."""
        found = find_res_dir()
        self.assertTrue(os.path.isfile(os.path.join(found, "config", "ion.config")), found)
        os.makedirs("res/config")
        open("res/config/ion.config", "w").close()
        self.assertEqual(find_res_dir(), "res")


class WheelTest(TestCase):
    """`pip install` of a wheel (not editable) gives a container that runs the pump."""

    timeout = 120

    def setUp(self):
        self.work = tempfile.mkdtemp(prefix="ion-wheel-")
        self.addCleanup(shutil.rmtree, self.work, True)

    def _command(self, *command, **options):
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=90, **options
        )
        if result.returncode != 0:
            self.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result.stdout

    def _fresh_venv(self):
        """A venv holding only the wheel; the dependencies come from the test's own
        site-packages by a plain path line (its editable-install .pth files are not read)."""
        wheels = os.path.join(self.work, "wheels")
        self._command(
            sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, CHECKOUT
        )
        (wheel,) = [os.path.join(wheels, name) for name in os.listdir(wheels)]
        venv = os.path.join(self.work, "venv")
        self._command(sys.executable, "-m", "venv", "--without-pip", venv)
        python = os.path.join(venv, "bin", "python")
        target = self._command(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        ).strip()
        with open(os.path.join(target, "ion-test-deps.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
        # --target: pip would otherwise find the test's own (editable) ion through that path
        # line and take the wheel as installed already.
        self._command(
            sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
            "--target", target, wheel,
        )
        return python

    def _env(self):
        return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def test_pump_runs_from_an_empty_directory(self):
        python = self._fresh_venv()
        run_dir = os.path.join(self.work, "run")
        os.mkdir(run_dir)
        where = self._command(
            python, "-c", "import ion; print(ion.__file__)", cwd=run_dir, env=self._env()
        )
        self.assertTrue(where.startswith(os.path.join(self.work, "venv")), where)
        os.makedirs(os.path.join(run_dir, "pump", "source"))
        with open(os.path.join(run_dir, "pump", "source", "a.txt"), "w") as f:
            f.write("hello\n")
        os.utime(os.path.join(run_dir, "pump", "source", "a.txt"), (time.time() - 10,) * 2)
        log = open(os.path.join(self.work, "container.log"), "w+")
        self.addCleanup(log.close)
        container = subprocess.Popen(
            [python, "-c", _TWISTD, "-n", "--pidfile=", "cc", "--no-shell", "res/apps/pump.app"],
            cwd=run_dir, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
        )
        self.addCleanup(lambda: container.poll() is None and container.kill())
        delivered = os.path.join(run_dir, "pump", "destination", "a.txt")
        deadline = time.monotonic() + 30
        while not os.path.exists(delivered) and time.monotonic() < deadline:
            if container.poll() is not None:
                break
            time.sleep(0.2)
        log.seek(0)
        output = log.read()
        self.assertTrue(os.path.exists(delivered), f"not delivered; container said:\n{output}")
        with open(delivered) as f:
            self.assertEqual(f.read(), "hello\n")
        container.send_signal(signal.SIGTERM)
        self.assertEqual(container.wait(timeout=30), 0)
