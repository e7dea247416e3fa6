"""Application and release files: checked before anything starts, started in dependency order."""

import os
import textwrap

from twisted.trial import unittest

from ion.core.app.appfile import AppFileError, read_app, read_rel
from ion.core.cc.testing import make_container

MODULE = "ion_test_app_events"


class AppFiles:
    """A temp res/ dir with app and rel files written by the test."""

    def setUp(self):
        self.res = os.path.abspath(self.mktemp())
        for sub in ("apps", "deploy"):
            os.makedirs(os.path.join(self.res, sub))

    def write(self, name, text):
        folder = "deploy" if name.endswith(".rel") else "apps"
        path = os.path.join(self.res, folder, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def app(self, name, deps=(), registered=(), config=None, kwargs=None):
        return self.write(
            f"{name}.app",
            repr(
                {
                    "type": "application",
                    "name": name,
                    "version": "1",
                    "mod": ("tests.core.app.sample", [], dict(kwargs or {}, tag=name)),
                    "applications": list(deps),
                    "registered": list(registered),
                    "config": config or {},
                }
            ),
        )


class AppFileTests(AppFiles, unittest.SynchronousTestCase):
    def test_bad_app_files(self):
        """Each malformed app file gives one line naming the file and the key."""
        cases = [
            ("{'type': 'application', 'name': 'a'}", "missing key 'mod'"),
            ("{'type': 'application', 'name': 'a', 'mod': ('m',), 'aplications': []}",
             "unknown key 'aplications'; valid keys are applications, config, description, mod, name, registered, type, version"),
            ("{'type': 'app', 'name': 'a', 'mod': ('m',)}", "key 'type' must be 'application'"),
            ("{'type': 'application', 'name': 'a', 'mod': 'm'}", "key 'mod' must be a tuple, got str"),
            ("{'type': 'application', 'name': 'a', 'mod': ('m', [], [])}", "key 'mod' must be (module, [args], {kwargs})"),
            ("{'type': 'application', 'name': 'a', 'mod': ('m',), 'applications': [1]}", "key 'applications' must list names"),
            ("{'type': 'application', 'name': 'a', 'mod': ('m',), 'config': {'x': 1}}", "key 'config' must map module names to dicts"),
            ("['not', 'a', 'dict']", "must be"),
            ("{'type': 'application',\n 'name': open('x')}", ":2: not a literal"),
        ]
        for text, expected in cases:
            path = self.write("a.app", text)
            e = self.assertRaises(AppFileError, read_app, path)
            self.assertIn(expected, str(e), text)
            self.assertTrue(str(e).startswith(path), str(e))
            self.assertNotIn("\n", str(e))

    def test_bad_rel_files(self):
        cases = [
            ("{'type': 'release', 'name': 'r'}", "missing key 'apps'"),
            ("{'type': 'release', 'name': 'r', 'apps': [{'name': 'a', 'mul': 2}]}", "unknown key 'mul' in apps[0]"),
            ("{'type': 'release', 'name': 'r', 'apps': [{'name': 'a', 'mult': 'x'}]}", "key 'mult' in apps[0] must be an int"),
            ("{'type': 'release', 'name': 'r', 'apps': [{'version': '1'}]}", "missing key 'name' in apps[0]"),
            ("{'type': 'release', 'name': 'r', 'apps': [{'name': 'a', 'mult': 0}]}", "key 'mult' in apps[0] must be 1 or more"),
        ]
        for text, expected in cases:
            path = self.write("r.rel", text)
            e = self.assertRaises(AppFileError, read_rel, path)
            self.assertIn(expected, str(e), text)


class ControllerTests(AppFiles, unittest.TestCase):
    def setUp(self):
        AppFiles.setUp(self)
        from tests.core.app import sample

        self.events = sample.events
        del self.events[:]

    async def container(self):
        c = await make_container(self)
        c.res_dir = self.res
        return c

    async def test_dependencies_start_first_and_stop_in_reverse(self):
        """Dependencies (found by name in res/apps) start before the app, and stop after it."""
        self.app("base")
        self.app("mid", deps=["base"])
        top = self.app("top", deps=["mid", "base"])
        c = await self.container()
        await c.apps.start_files([top])
        self.assertEqual(list(c.apps.running), ["base", "mid", "top"])
        await c.apps.stop_all()
        self.assertEqual(
            self.events,
            [("start", "base"), ("start", "mid"), ("start", "top"),
             ("stop", "top"), ("stop", "mid"), ("stop", "base")],
        )

    async def test_problems_found_before_anything_starts(self):
        """A cycle, a missing dependency, a missing module or a registered-name clash is
        reported and no app starts."""
        self.app("c1", deps=["c2"])
        self.app("c2", deps=["c1"])
        self.app("lonely", deps=["ghost"])
        self.write("nomod.app", "{'type': 'application', 'name': 'nomod', 'mod': ('no.such.mod',)}")
        self.app("r1", registered=["svc"])
        self.app("r2", registered=["svc"])
        c = await self.container()
        for files, expected in [
            (["c1"], "dependency cycle"),
            (["lonely"], "names 'ghost'"),
            (["nomod"], "cannot import 'no.such.mod'"),
            (["r1", "r2"], "'svc' is already registered by app 'r1'"),
        ]:
            e = self.assertRaises(AppFileError, c.apps.plan, files)
            self.assertIn(expected, str(e))
        self.assertEqual(self.events, [])

    async def test_kwargs_and_config_precedence(self):
        """kwargs: app mod < rel args < apparg; config: app < rel entry, visible to the app."""
        self.app("k", kwargs={"a": "app", "b": "app", "c": "app"},
                 config={"k.mod": {"x": "app", "y": "app"}})
        rel = self.write("k.rel", repr({
            "type": "release", "name": "rel", "version": "1",
            "apps": [{"name": "k", "args": {"b": "rel", "c": "rel"}, "config": {"k.mod": {"y": "rel"}}}],
        }))
        c = await self.container()
        c.apps.apparg = {"k": {"c": "cmdline"}}
        await c.apps.start_files([rel])
        kwargs = c.apps.running["k"].state["kwargs"]
        self.assertEqual((kwargs["a"], kwargs["b"], kwargs["c"]), ("app", "rel", "cmdline"))
        self.assertEqual(c.config.section("k.mod"), {"x": "app", "y": "rel"})

    async def test_rel_mult_runs_copies(self):
        """A rel entry with mult: 3 runs three copies of the app, each knowing its name; all
        stop, last first."""
        self.app("m")
        rel = self.write("m.rel", repr({"type": "release", "name": "rel",
                                        "apps": [{"name": "m", "mult": 3}]}))
        c = await self.container()
        await c.apps.start_files([rel])
        self.assertEqual(list(c.apps.running), ["m", "m.2", "m.3"])
        # Each copy's start() is told its own name, to keep its state apart.
        self.assertEqual([app.state["app"] for app in c.apps.running.values()], ["m", "m.2", "m.3"])
        self.assertEqual(self.events, [("start", "m")] * 3)
        await c.apps.stop_all()
        self.assertEqual(self.events[3:], [("stop", "m")] * 3)
        self.assertEqual(c.apps.running, {})
