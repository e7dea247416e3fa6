"""C{.app} and C{.rel} files: Python literals describing applications and releases.

An application file (C{res/apps/<name>.app})::

    {'type': 'application', 'name': 'hello', 'description': '...', 'version': '0.1',
     'mod': ('ion.apps.hello.app', [], {'instances': 1}),
     'applications': ['ioncore'], 'registered': ['hello'],
     'config': {'ion.apps.hello': {'greeting': 'Hello'}}}

A release file (C{res/deploy/<name>.rel})::

    {'type': 'release', 'name': 'demo', 'version': '0.1',
     'apps': [{'name': 'hello', 'version': '0.1', 'config': {...}, 'args': {...}, 'mult': 1}]}

C{mult: N} in a rel entry runs N copies of the app (named hello, hello.2, ... hello.N).

Both are read with C{ast.literal_eval} and checked before anything starts; every problem is an
L{AppFileError} with one line naming the file and the key.
"""

import os

import attrs

from ion.core.config import ConfigError, read_literal_tree

APP_KEYS = {
    "type": str,
    "name": str,
    "description": str,
    "version": str,
    "mod": tuple,
    "applications": list,
    "registered": list,
    "config": dict,
}
REL_KEYS = {"type": str, "name": str, "description": str, "version": str, "apps": list}
REL_APP_KEYS = {"name": str, "version": str, "config": dict, "args": dict, "mult": int}


class AppFileError(Exception):
    """A bad .app or .rel file; the message is one line naming the file and the key."""


@attrs.define
class AppSpec:
    path: str
    name: str
    module: str
    args: list
    kwargs: dict
    version: str = ""
    description: str = ""
    applications: list = attrs.field(factory=list)
    registered: list = attrs.field(factory=list)
    config: dict = attrs.field(factory=dict)


@attrs.define
class RelEntry:
    name: str
    version: str = ""
    config: dict = attrs.field(factory=dict)
    args: dict = attrs.field(factory=dict)
    mult: int = 1


@attrs.define
class RelSpec:
    path: str
    name: str
    version: str
    apps: list


def _type_name(t):
    return {str: "a string", list: "a list", tuple: "a tuple", dict: "a dict", int: "an int"}[t]


def _check_keys(path, data, keys, required=(), where=""):
    unknown = sorted(set(data) - set(keys), key=str)
    if unknown:
        raise AppFileError(
            f"{path}: unknown key {unknown[0]!r}{where}; valid keys are {', '.join(sorted(keys))}"
        )
    for key, expected in keys.items():
        if key in data:
            value = data[key]
            ok = isinstance(value, expected) or (expected is tuple and isinstance(value, list))
            if not ok or (expected is int and isinstance(value, bool)):
                raise AppFileError(
                    f"{path}: key {key!r}{where} must be {_type_name(expected)}, "
                    f"got {type(value).__name__}"
                )
    for key in required:
        if key not in data:
            raise AppFileError(f"{path}: missing key {key!r}{where}")


def _read(path):
    try:
        return read_literal_tree(path)[0]
    except ConfigError as e:
        raise AppFileError(str(e)) from None


def read_app(path):
    """Parse and check an .app file; returns an AppSpec."""
    data = _read(path)
    _check_keys(path, data, APP_KEYS, ("type", "name", "mod"))
    if data["type"] != "application":
        raise AppFileError(f"{path}: key 'type' must be 'application', got {data['type']!r}")
    mod = tuple(data["mod"])
    if not 1 <= len(mod) <= 3 or not isinstance(mod[0], str) or not mod[0]:
        raise AppFileError(f"{path}: key 'mod' must be (module, [args], {{kwargs}})")
    args = mod[1] if len(mod) > 1 else []
    kwargs = mod[2] if len(mod) > 2 else {}
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise AppFileError(f"{path}: key 'mod' must be (module, [args], {{kwargs}})")
    for key in ("applications", "registered"):
        for item in data.get(key, []):
            if not isinstance(item, str):
                raise AppFileError(f"{path}: key {key!r} must list names (strings), got {item!r}")
    _check_config(path, data.get("config", {}), "config")
    return AppSpec(
        path=path,
        name=data["name"],
        module=mod[0],
        args=list(args),
        kwargs=dict(kwargs),
        version=data.get("version", ""),
        description=data.get("description", ""),
        applications=list(data.get("applications", [])),
        registered=list(data.get("registered", [])),
        config=data.get("config", {}),
    )


def _check_config(path, config, where):
    for module, section in config.items():
        if not isinstance(module, str) or not isinstance(section, dict):
            raise AppFileError(
                f"{path}: key {where!r} must map module names to dicts, got {module!r}: "
                f"{type(section).__name__}"
            )


def read_rel(path):
    """Parse and check a .rel file; returns a RelSpec."""
    data = _read(path)
    _check_keys(path, data, REL_KEYS, ("type", "name", "apps"))
    if data["type"] != "release":
        raise AppFileError(f"{path}: key 'type' must be 'release', got {data['type']!r}")
    entries = []
    for i, entry in enumerate(data["apps"]):
        where = f" in apps[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise AppFileError(f"{path}: apps[{i}] must be a dict or an app name")
        _check_keys(path, entry, REL_APP_KEYS, ("name",), where)
        if entry.get("mult", 1) < 1:
            raise AppFileError(f"{path}: key 'mult'{where} must be 1 or more")
        _check_config(path, entry.get("config", {}), f"apps[{i}].config")
        entries.append(RelEntry(**entry))
    return RelSpec(path=path, name=data["name"], version=data.get("version", ""), apps=entries)


def find_file(name_or_path, res_dir, kind):
    """A path for an app/rel given by path or by name.

    A file at C{name_or_path} wins; a relative path that is not a file here is looked for
    under C{res_dir} (C{res/apps/pump.app} and C{apps/pump.app} both name the shipped
    C{<res_dir>/apps/pump.app}), then the bare name in C{res_dir}'s C{apps} or C{deploy}. A
    directory is never taken for an app or rel file (C{pump} is the app even where the pump
    has made a C{./pump/} directory).
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    candidates = []
    if not os.path.isabs(name_or_path):
        relative = os.path.normpath(name_or_path)
        first, _, rest = relative.partition(os.sep)
        if first == "res" and rest:
            relative = rest
        if not relative.startswith(os.pardir):
            candidates.append(os.path.join(res_dir, relative))
    folder = {"app": "apps", "rel": "deploy"}[kind]
    base = os.path.basename(name_or_path.rstrip("/" + os.sep))
    if not base.endswith("." + kind):
        base += "." + kind
    candidates.append(os.path.join(res_dir, folder, base))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    others = [c for c in dict.fromkeys(candidates) if c != name_or_path]
    looked = f" (also looked for {' and '.join(others)})" if others else ""
    raise AppFileError(f"{name_or_path}: no such file{looked}")
