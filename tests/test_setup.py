"""setup.py's dependencies are exactly the distributions the code imports."""

import ast
import importlib.metadata
import os
import re
import sys

from twisted.trial.unittest import SynchronousTestCase

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(*directories):
    """The top-level names imported by the Python files under `directories`, outside the
    standard library and the project itself."""
    names = set()
    for directory in directories:
        for root, _, files in os.walk(os.path.join(CHECKOUT, directory)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names.update(alias.name.split(".")[0] for alias in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"ion", "tests", "bench"}


def distributions(modules):
    """The distributions (normalized names) providing `modules`."""
    providers = importlib.metadata.packages_distributions()
    found = set()
    for module in modules:
        # This project ships twisted/plugins/cc_plugin.py: it provides `twisted` too.
        names = {normalized(d) for d in providers.get(module, [])} - {"ion"}
        if len(names) != 1:
            raise AssertionError(f"cannot tell which distribution provides {module}: {names}")
        found |= names
    return found


def declared():
    """install_requires and extras_require of setup.py, as normalized distribution names."""
    with open(os.path.join(CHECKOUT, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    (call,) = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    ]
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}

    def names(requirements):
        return {normalized(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in requirements}

    extras = ast.literal_eval(keywords["extras_require"])
    return names(ast.literal_eval(keywords["install_requires"])), {
        extra: names(requirements) for extra, requirements in extras.items()
    }


class DependenciesTests(SynchronousTestCase):
    def test_install_requires_is_what_ion_imports(self):
        """A fresh `pip install .` has every distribution ion/ imports, and nothing it does
        not: no import fails on a clean machine, no unused package is pulled in."""
        required, _ = declared()
        self.assertEqual(required, distributions(imported_modules("ion", "twisted")))

    def test_test_extra_is_what_the_tests_add(self):
        """`pip install .[test]` adds exactly what tests/ and bench/ import beyond ion's own
        dependencies."""
        required, extras = declared()
        used = distributions(imported_modules("tests", "bench"))
        self.assertEqual(extras["test"], used - required)
