"""Layered configuration read from Python literal files and the command line.

A config file is a dict literal keyed by module name::

    {'ion.core.process': {'rpc_timeout': 15}}

Layers are kept lowest first (C{ion.config} < C{ionlocal.config} < app and rel layers < command
line) and merged deeply each time a value is asked for, so a layer added later is seen by the next
lookup. Plain values (and keys no layer sets) are remembered until a layer is added or a value
defined: some are read for every message.

The keys ION itself reads are in L{SCHEMA}, each with the kind of value it takes: L{Config.check}
finds a value of the wrong type or out of range once the layers are merged (C{twistd cc} calls it
before anything starts), and L{Config.add_layer} checks the values a layer added later brings, so a
typo is one line at start, not a TypeError at the first use.
"""

import ast
import copy
import os

import attrs

_MISSING = object()
_ABSENT = object()  # Config._cache: no layer sets the key
_PLAIN = (str, int, float, bool, type(None), bytes)

COMMAND_LINE = "command line"
DEFINE_FORM = "module:key=value"


class ConfigError(Exception):
    """Bad configuration input: the message names the file (and line when known).

    @ivar problem: what is wrong, without the location.
    @ivar path: the file at fault, or C{None}.
    @ivar line: the 1-based line at fault, or C{None}.
    """

    def __init__(self, problem, path=None, line=None):
        self.problem = problem
        self.path = path
        self.line = line
        super().__init__(problem, path, line)

    def __str__(self):
        if self.path is None:
            return self.problem
        if self.line is None:
            return f"{self.path}: {self.problem}"
        return f"{self.path}:{self.line}: {self.problem}"


class ConfigKeyError(ConfigError, KeyError):
    """A config value was asked for that no layer defines."""


def _type_names(expect):
    types = expect if isinstance(expect, tuple) else (expect,)
    names = [t.__name__ for t in types]
    article = "an" if names[0][0] in "aeiou" else "a"
    return f"{article} {' or '.join(names)}"


def _first_non_literal(node):
    """Find the innermost node that stops C{node} from being a literal."""
    if isinstance(node, ast.Dict):
        children = []
        for key, value in zip(node.keys, node.values):
            if key is None:
                return value
            children += [key, value]
    elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        children = node.elts
    else:
        return node
    for child in children:
        try:
            ast.literal_eval(child)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return _first_non_literal(child)
    return node


def _find_duplicate_key(node):
    """Find a dict key that appears twice in the same literal dict.

    Python keeps the last of two equal keys silently; in a config file that almost always means a
    section or setting was lost by accident.
    """
    for child in ast.walk(node):
        if isinstance(child, ast.Dict):
            seen = set()
            for key in child.keys:
                value = ast.literal_eval(key)
                try:
                    duplicate = value in seen
                except TypeError:
                    continue
                if duplicate:
                    return key, value
                seen.add(value)
    return None


def read_literal_tree(path, expect=dict, what=None):
    """Read a file holding one Python literal (never executing anything; comments allowed),
    returning C{(value, node)}.

    C{node} is the parsed expression, so callers validating the value further can point at the line
    of an offending entry (see L{node_line}).

    @param expect: the type (or tuple of types) the top level must have.
    @param what: how to describe the expected top level in an error, e.g.
        C{"a dict of module names to dicts"}; defaults to the type name.
    @raise ConfigError: the file is missing, unreadable, not a literal or of
        the wrong type.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("no such file", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", path) from None
    if not text.strip():
        raise ConfigError("empty file", path)
    try:
        tree = ast.parse(text, filename=path, mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"malformed literal: {e.msg}", path, e.lineno) from None
    except (ValueError, MemoryError, RecursionError) as e:
        raise ConfigError(f"malformed literal: {e}", path) from None
    node = tree.body
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        bad = _first_non_literal(node)
        source = " ".join((ast.get_source_segment(text, bad) or ast.dump(bad)).split())
        if len(source) > 60:
            source = source[:57] + "..."
        raise ConfigError(f"not a literal: {source}", path, getattr(bad, "lineno", None)) from None
    duplicate = _find_duplicate_key(node)
    if duplicate is not None:
        key, key_value = duplicate
        raise ConfigError(f"duplicate key {key_value!r}", path, key.lineno)
    if not isinstance(value, expect):
        raise ConfigError(
            f"top level must be {what or _type_names(expect)}, got {type(value).__name__}",
            path,
        )
    return value, node


def node_line(node, where):
    """The line of an entry inside a literal node read by L{read_literal_tree}.

    @param where: a dict key (the line of its value is returned) or a list or
        tuple index.
    @return: a 1-based line number, or C{None} when it cannot be found.
    """
    if isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values):
            if key is not None and ast.literal_eval(key) == where:
                return value.lineno
    elif isinstance(node, (ast.List, ast.Tuple)) and where in range(len(node.elts)):
        return node.elts[where].lineno
    return getattr(node, "lineno", None)


_SECTIONS = "a dict of module names to dicts"


def _check_layer(mapping, path=None, node=None, name=None):
    where = "" if name is None else f"config layer {name!r}: "
    if not isinstance(mapping, dict):
        raise ConfigError(
            f"{where}top level must be {_SECTIONS}, got {type(mapping).__name__}", path
        )
    for module, section in mapping.items():
        line = None if node is None else node_line(node, module)
        if not isinstance(module, str) or not module:
            raise ConfigError(
                f"{where}module names must be non-empty strings, got {module!r}", path, line
            )
        if not isinstance(section, dict):
            raise ConfigError(
                f"{where}section {module!r} must be a dict, got {type(section).__name__}",
                path,
                line,
            )


def _merge_into(target, source):
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@attrs.frozen
class Setting:
    """The kind of value a config key takes: C{check(value)} returns what is wrong, or None.

    @ivar kind: what the value must be, for an error (C{"a number > 0"}).
    """

    kind: str
    _test: object

    def check(self, value):
        return None if self._test(value) else f"must be {self.kind}, got {value!r}"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(digits=False):
    # The message size limits also take a string of digits (see codec.Limits.from_config).
    def test(value):
        if digits and isinstance(value, str):
            value = value.strip().replace("_", "")
            value = int(value) if value.isdigit() else None
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    return Setting("an integer > 0", test)


def _text(optional=False):
    kind = "a non-empty string" + (" or None" if optional else "")
    return Setting(kind, lambda v: (optional and v is None) or (isinstance(v, str) and v != ""))


_BOOL = Setting("True or False", lambda v: isinstance(v, bool))
_POSITIVE_NUMBER = Setting("a number > 0", lambda v: _is_number(v) and v > 0)

#: The config keys ION reads, per module: res/config/ion.config's, and those of the
#: shipped apps (set in their .app files). Other keys and modules are the user's own.
SCHEMA = {
    "ion.core.messaging": {
        "broker": Setting(
            "a broker URL, or a list of them",
            lambda v: (isinstance(v, str) and v != "")
            or (isinstance(v, list) and v and all(isinstance(u, str) and u for u in v)),
        ),
        "broker_ca": _text(optional=True),
        "broker_cert": _text(optional=True),
        "broker_key": _text(optional=True),
        "broker_retry": Setting("a number of seconds >= 0", lambda v: _is_number(v) and v >= 0),
        "sysname": _text(),
        **{key: _positive_int(digits=True) for key in (
            "max_message_bytes", "max_str_len", "max_bin_len", "max_array_len",
            "max_map_len", "max_objects",
        )},
        "prefetch": _positive_int(),
        "queue_type": Setting(
            "'auto', 'classic' or 'quorum'", lambda v: v in ("auto", "classic", "quorum")
        ),
        "delivery_limit": _positive_int(),
        "memory_run_record": _text(optional=True),
        "trace": _BOOL,
    },
    "ion.core.process": {
        "rpc_timeout": _POSITIVE_NUMBER,
        "terminate_timeout": _POSITIVE_NUMBER,
    },
    "ion.core.conversation": {
        "tombstone_ttl": Setting("a number >= 0", lambda v: _is_number(v) and v >= 0),
    },
    "ion.core.cc": {
        "web": Setting("[ADDRESS:]PORT or None", lambda v: v is None or isinstance(v, (int, str))),
        "sample_interval": _POSITIVE_NUMBER,
    },
    "ion.core.cc.agent": {
        "heartbeat_interval": _POSITIVE_NUMBER,
        "missed_heartbeats": _positive_int(),
    },
    "ion.apps.hello": {"greeting": Setting("a string", lambda v: isinstance(v, str))},
    "ion.apps.observer": {"keep": _positive_int()},
    "ion.apps.pump": {"user": _text(optional=True)},
}


class Config:
    """Named configuration layers, lowest first, merged deeply at lookup time.

    Values set with L{define} live in a C{'command line'} layer that always stays on top, whatever
    is added after it.
    """

    def __init__(self):
        self._layers = []
        self._defines = {}
        self._paths = {}
        self._cache = {}  # (module, key) -> plain value or _ABSENT, as L{get} found it

    @classmethod
    def load(cls, res_dir="res"):
        """Build a config from C{<res_dir>/config/ion.config} (required) and
        C{<res_dir>/config/ionlocal.config} (if present).

        @raise ConfigError: a file is missing, malformed or of the wrong shape.
        """
        config = cls()
        for name, required in [("ion.config", True), ("ionlocal.config", False)]:
            path = os.path.join(res_dir, "config", name)
            if not required and not os.path.exists(path):
                continue
            mapping, node = read_literal_tree(path, dict, _SECTIONS)
            _check_layer(mapping, path, node)
            config._layers.append((name, mapping))
            config._paths[name] = path
        return config

    @property
    def layers(self):
        """The layers as a list of C{(name, dict)}, lowest first, including the command line layer
        when something was defined."""
        layers = list(self._layers)
        if self._defines:
            layers.append((COMMAND_LINE, self._defines))
        return layers

    def add_layer(self, name, mapping):
        """Add a layer above all others except the command line layer.

        The mapping is copied: changing it afterwards does not change the config.

        @raise ConfigError: C{mapping} is not a dict of module names to dicts, or a
            value it brings does not fit L{SCHEMA}; the layer is then not added.
        """
        _check_layer(mapping, name=name)
        self._layers.append((name, copy.deepcopy(mapping)))
        self._cache = {}
        try:
            self.check(mapping)
        except ConfigError:
            self._layers.pop()
            self._cache = {}
            raise

    def check(self, modules=None):
        """Check the merged values of the keys in L{SCHEMA} (of C{modules}, default all).

        @raise ConfigError: one line naming the layer the bad value comes from (its
            file, C{-D/--define} or its layer name), the module, the key and the value.
        """
        for module in SCHEMA if modules is None else modules:
            settings = SCHEMA.get(module)
            if not settings:
                continue
            section = self.section(module)
            for key, setting in settings.items():
                if key not in section:
                    continue
                problem = setting.check(section[key])
                if problem is not None:
                    raise ConfigError(f"{module}:{key} {problem}", self._origin(module, key))

    def check_with(self, layers):
        """L{check} the values as they will be once C{layers} (C{(name, mapping)}, the config of the
        apps about to start) are added, without adding them."""
        probe = copy.copy(self)
        probe._layers = list(self._layers)
        probe._cache = {}
        for name, mapping in layers:
            probe.add_layer(name, mapping)
        probe.check()

    def _origin(self, module, key):
        for name, mapping in reversed(self.layers):
            if key in mapping.get(module, {}):
                if name == COMMAND_LINE:
                    return "-D/--define"
                return self._paths.get(name, f"config layer {name!r}")
        return None

    def unknown_modules(self, known=()):
        """The modules set on the command line (C{-D}) that neither L{SCHEMA}, a config layer, nor
        C{known} (the modules the apps about to start configure) mention: most likely a typo, as
        nothing reads them."""
        mentioned = set(SCHEMA) | set(known)
        for _name, mapping in self._layers:
            mentioned.update(mapping)
        return sorted(module for module in self._defines if module not in mentioned)

    def unknown_keys(self):
        """The C{(module, key)} set on the command line (C{-D}) for a module of L{SCHEMA} that has
        no such key: a misspelt key would otherwise be ignored silently."""
        return sorted(
            (module, key)
            for module, section in self._defines.items()
            if module in SCHEMA
            for key in section
            if key not in SCHEMA[module]
        )

    def define(self, module, key, value):
        """Set C{key} of C{module} in the command line layer.

        A dotted key (C{'transfer.workers'}) sets a value inside nested dicts, creating them as
        needed.

        @raise ValueError: empty module or key, or an empty part in a dotted key.
        """
        if not module:
            raise ValueError(f"empty module name; expected {DEFINE_FORM}")
        parts = key.split(".")
        if not all(parts):
            raise ValueError(f"bad key {key!r}: empty part in dotted key")
        self._cache = {}
        target = self._defines.setdefault(module, {})
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value

    def section(self, module):
        """A fresh dict of C{module}'s settings, merged deeply across all layers."""
        merged = {}
        for _name, mapping in self.layers:
            if module in mapping:
                _merge_into(merged, mapping[module])
        return merged

    def get(self, module, key, default=_MISSING):
        """The current value of C{key} in C{module}'s section.

        A key not found as is but containing dots is looked up as a path into nested dicts
        (C{'transfer.workers'}).

        @raise ConfigKeyError: no layer defines it and no default was given.
        """
        # Some run for every message: what was found plain or absent is remembered.
        value = self._cache.get((module, key), _MISSING)
        if value is _MISSING:
            value = self._lookup(module, key)
            if value is _ABSENT or isinstance(value, _PLAIN):
                self._cache[(module, key)] = value
        if value is not _ABSENT:
            return value
        if default is _MISSING:
            raise ConfigKeyError(
                f"no config value for {module}:{key}; set it in "
                f"res/config/ionlocal.config or with -D {module}:{key}=VALUE"
            )
        return default

    def _lookup(self, module, key):
        """The value of L{get}, or _ABSENT; a dict is a fresh one."""
        # The top layer holding a plain value wins.
        for _name, mapping in reversed(self.layers):
            found = mapping.get(module)
            if found is not None and key in found:
                value = found[key]
                if isinstance(value, _PLAIN):
                    return value
                break
        section = self.section(module)
        if key in section:
            return section[key]
        value = section
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return _ABSENT
            value = value[part]
        return value


def parse_define(text):
    """Parse a command line override C{module:key=value}.

    The value is read as a Python literal when it is one (C{5}, C{True}, C{[1, 2]}) and kept as a
    string otherwise (C{amqp://host}).

    @return: C{(module, key, value)}
    @raise ValueError: C{text} is not of the form C{module:key=value}.
    """
    target, equals, raw = text.partition("=")
    module, colon, key = target.partition(":")
    module, key = module.strip(), key.strip()

    def bad(problem):
        return ValueError(f"bad define {text!r}: {problem}; expected {DEFINE_FORM}")

    if not equals:
        raise bad("missing '='")
    if not colon:
        raise bad("missing ':' between module and key")
    if not module:
        raise bad("empty module name")
    if not key:
        raise bad("empty key")
    if not all(module.split(".")) or not all(key.split(".")):
        raise bad("empty part in a dotted name")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        value = raw
    return module, key, value
