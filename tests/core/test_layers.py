"""The core is a framework under the apps: it never imports one of them."""

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import ion.core

CORE = os.path.dirname(ion.core.__file__)


def imported_modules(path):
    """Every module name an import statement in the file at `path` names, at any depth."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


class LayerTests(SynchronousTestCase):
    def test_core_never_imports_an_app(self):
        """An app can be left out of a deployment (or replaced) without breaking the core:
        what the core needs from an app (the shell's charts) it asks for over rpc."""
        found = []
        for top, _, names in os.walk(CORE):
            for name in sorted(names):
                if name.endswith(".py"):
                    path = os.path.join(top, name)
                    found += [
                        f"{os.path.relpath(path, CORE)}: {module}"
                        for module in imported_modules(path)
                        if module == "ion.apps" or module.startswith("ion.apps.")
                    ]
        self.assertEqual(found, [])
