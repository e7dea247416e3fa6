"""
Tests for L{ion.core.config}.
"""

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from ion.core.config import (
    Config,
    ConfigError,
    ConfigKeyError,
    SCHEMA,
    parse_define,
    read_literal_tree,
)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def read_literal_file(path, expect=dict):
    return read_literal_tree(path, expect)[0]


class ReadLiteralFileTests(SynchronousTestCase):
    """
    L{read_literal_tree} reads literals and reports bad files as one line
    naming the file and line.
    """

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def path(self, text, name="x.config"):
        return write(os.path.join(self.dir, name), text)

    def assertConfigError(self, path, text, expected, line):
        error = self.assertRaises(ConfigError, read_literal_file, self.path(text))
        self.assertEqual(str(error), expected.format(path=path))
        self.assertEqual(error.path, path)
        self.assertEqual(error.line, line)
        return error

    def test_readsDictWithComments(self):
        """
        Comments are allowed; the literal comes back as is.
        """
        path = self.path("# defaults\n{'m': {'a': 1, 'b': [1, 2]}}  # trailing\n")
        self.assertEqual(read_literal_file(path), {"m": {"a": 1, "b": [1, 2]}})

    def test_expectOtherType(self):
        """
        C{expect} lets the same reader load lists (log levels, .rel entries).
        """
        path = self.path("[('ion', 'warn')]")
        self.assertEqual(read_literal_file(path, expect=list), [("ion", "warn")])

    def test_syntaxErrorNamesFileAndLine(self):
        """
        A syntax error is reported as C{path:line: malformed literal: ...}.
        """
        path = os.path.join(self.dir, "x.config")
        error = self.assertRaises(
            ConfigError, read_literal_file, self.path("{\n 'a': {},\n 'b': {'x': 1 'y': 2},\n}\n")
        )
        self.assertEqual(error.line, 3)
        self.assertTrue(str(error).startswith(f"{path}:3: malformed literal: "), str(error))
        self.assertNotIn("\n", str(error))

    def test_nonLiteralIsNotExecuted(self):
        """
        A call is refused as "not a literal", with its line, and never runs.
        """
        sentinel = os.path.abspath(os.path.join(self.dir, "executed"))
        path = os.path.join(self.dir, "x.config")
        text = f"{{\n 'a': {{}},\n 'b': open({sentinel!r}, 'w'),\n}}\n"
        error = self.assertRaises(ConfigError, read_literal_file, self.path(text))
        self.assertEqual(error.line, 3)
        self.assertTrue(str(error).startswith(f"{path}:3: not a literal: open("), str(error))
        self.assertFalse(os.path.exists(sentinel))

    def test_importIsNotALiteral(self):
        """
        C{__import__('os')} is refused as not a literal, naming the expression.
        """
        path = os.path.join(self.dir, "x.config")
        self.assertConfigError(
            path, "{'a': __import__('os')}", "{path}:1: not a literal: __import__('os')", 1
        )

    def test_nameIsNotALiteral(self):
        """
        A bare name (a forgotten quote) is refused as not a literal.
        """
        path = os.path.join(self.dir, "x.config")
        self.assertConfigError(
            path, "{'m':\n {'broker': memory}}", "{path}:2: not a literal: memory", 2
        )

    def test_arithmeticIsNotALiteral(self):
        """
        Arithmetic such as C{16*1024*1024} is refused: write the number.
        """
        path = os.path.join(self.dir, "x.config")
        self.assertConfigError(path, "{'m': {'n': 16*1024}}", "{path}:1: not a literal: 16*1024", 1)

    def test_duplicateKey(self):
        """
        A key given twice in one dict is an error, not a silently lost value.
        """
        path = os.path.join(self.dir, "x.config")
        self.assertConfigError(
            path, "{'m': {'a': 1},\n 'm': {'b': 2}}", "{path}:2: duplicate key 'm'", 2
        )

    def test_wrongTopLevelType(self):
        """
        A top level of the wrong type is reported with the type found.
        """
        path = os.path.join(self.dir, "x.config")
        self.assertConfigError(path, "[1, 2]", "{path}: top level must be a dict, got list", None)

    def test_missingFile(self):
        """
        A missing file is C{path: no such file}.
        """
        path = os.path.join(self.dir, "nope.config")
        error = self.assertRaises(ConfigError, read_literal_file, path)
        self.assertEqual(str(error), f"{path}: no such file")
        self.assertEqual((error.path, error.line), (path, None))

    def test_emptyFile(self):
        """
        An empty file is a malformed literal, not a traceback.
        """
        error = self.assertRaises(ConfigError, read_literal_file, self.path("# nothing\n"))
        self.assertIn("malformed literal", str(error))


class ConfigLoadTests(SynchronousTestCase):
    """
    L{Config.load} reads C{ion.config} then the optional C{ionlocal.config}.
    """

    def setUp(self):
        self.res = self.mktemp()
        self.config_dir = os.path.join(self.res, "config")

    def test_shippedDefaults(self):
        """
        The shipped C{res/config/ion.config} loads and has the documented defaults.
        """
        here = os.path.dirname(os.path.abspath(__file__))
        res = os.path.join(here, os.pardir, os.pardir, "res")
        layer = read_literal_file(os.path.join(res, "config", "ion.config"))
        config = Config()
        config.add_layer("ion.config", layer)
        self.assertEqual(config.get("ion.core.process", "rpc_timeout"), 15)
        self.assertEqual(config.get("ion.core.messaging", "broker"), "memory://")
        self.assertEqual(config.get("ion.core.messaging", "max_message_bytes"), 16777216)
        self.assertEqual(config.get("ion.core.conversation", "tombstone_ttl"), 60)
        self.assertEqual(config.get("ion.core.process", "terminate_timeout"), 10)

    def test_shippedKeysAreRead(self):
        """
        Every key of the shipped C{res/config/ion.config} is named in the code of ion/: a
        documented setting that nothing reads would silently do nothing.
        """
        here = os.path.dirname(os.path.abspath(__file__))
        checkout = os.path.join(here, os.pardir, os.pardir)
        layer = read_literal_file(os.path.join(checkout, "res", "config", "ion.config"))
        sources = []
        for root, _, files in os.walk(os.path.join(checkout, "ion")):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        sources.append(f.read())
        code = "\n".join(sources)
        unread = [
            f"{module}: {key}"
            for module, section in layer.items()
            for key in section
            if not re.search(rf"\b{key}\b", code)
        ]
        self.assertEqual(unread, [])

    def test_layerOrder(self):
        """
        ion.config < ionlocal.config < later layers < command line.
        """
        write(
            os.path.join(self.config_dir, "ion.config"),
            "{'m': {'a': 'ion', 'b': 'ion', 'c': 'ion', 'd': 'ion'}}",
        )
        write(
            os.path.join(self.config_dir, "ionlocal.config"),
            "{'m': {'b': 'local', 'c': 'local', 'd': 'local'}}",
        )
        config = Config.load(self.res)
        config.add_layer("app", {"m": {"c": "app", "d": "app"}})
        config.define("m", "d", "cli")
        config.add_layer("rel", {"m": {"d": "rel"}})
        self.assertEqual(config.section("m"), {"a": "ion", "b": "local", "c": "app", "d": "cli"})
        self.assertEqual(
            [name for name, _ in config.layers],
            ["ion.config", "ionlocal.config", "app", "rel", "command line"],
        )

    def test_localOptional(self):
        """
        Without C{ionlocal.config} only C{ion.config} is loaded.
        """
        write(os.path.join(self.config_dir, "ion.config"), "{'m': {'a': 1}}")
        config = Config.load(self.res)
        self.assertEqual(config.layers, [("ion.config", {"m": {"a": 1}})])

    def test_ionConfigRequired(self):
        """
        A missing C{ion.config} is a L{ConfigError} naming it.
        """
        error = self.assertRaises(ConfigError, Config.load, self.res)
        path = os.path.join(self.config_dir, "ion.config")
        self.assertEqual(str(error), f"{path}: no such file")

    def test_wrongTopLevelNamesFile(self):
        """
        A config file that is not a dict says what shape it should have.
        """
        path = write(os.path.join(self.config_dir, "ion.config"), "['m']")
        error = self.assertRaises(ConfigError, Config.load, self.res)
        self.assertEqual(
            str(error), f"{path}: top level must be a dict of module names to dicts, got list"
        )

    def test_sectionNotDictNamesFileAndLine(self):
        """
        A module section that is not a dict is reported with file and line.
        """
        write(os.path.join(self.config_dir, "ion.config"), "{'m': {}}")
        path = write(os.path.join(self.config_dir, "ionlocal.config"), "{\n 'm': {},\n 'n': 5,\n}")
        error = self.assertRaises(ConfigError, Config.load, self.res)
        self.assertEqual(str(error), f"{path}:3: section 'n' must be a dict, got int")


class ConfigTests(SynchronousTestCase):
    """
    L{Config} merges layers deeply, at the time a value is asked for.
    """

    def test_empty(self):
        """
        An empty config has no layers and empty sections.
        """
        config = Config()
        self.assertEqual(config.layers, [])
        self.assertEqual(config.section("m"), {})

    def test_deepMerge(self):
        """
        Nested dicts merge key by key; later layers win; non-dict values replace.
        """
        config = Config()
        config.add_layer("one", {"m": {"t": {"a": 1, "b": {"x": 1, "y": 2}}, "l": [1, 2], "s": 1}})
        config.add_layer("two", {"m": {"t": {"b": {"y": 3}, "c": 4}, "l": [3], "s": {"k": 1}}})
        self.assertEqual(
            config.section("m"),
            {"t": {"a": 1, "b": {"x": 1, "y": 3}, "c": 4}, "l": [3], "s": {"k": 1}},
        )

    def test_dictReplacedByValue(self):
        """
        A non-dict value in a later layer replaces a dict from an earlier one.
        """
        config = Config()
        config.add_layer("one", {"m": {"t": {"a": 1}}})
        config.add_layer("two", {"m": {"t": None}})
        self.assertEqual(config.get("m", "t"), None)

    def test_lookupAtUseTime(self):
        """
        A layer added after a first lookup changes what the next lookup returns.
        """
        config = Config()
        config.add_layer("one", {"m": {"a": 1}})
        self.assertEqual(config.get("m", "a"), 1)
        config.add_layer("two", {"m": {"a": 2}})
        self.assertEqual(config.get("m", "a"), 2)
        config.define("m", "a", 3)
        self.assertEqual(config.get("m", "a"), 3)

    def test_absentThenSet(self):
        """
        A key no layer set, looked up (with a default), is found once a layer or a define
        sets it; a dict value is a fresh one at every lookup.
        """
        config = Config()
        config.add_layer("one", {"m": {"a": 1}})
        self.assertEqual(config.get("m", "b", 7), 7)
        self.assertEqual(config.get("m", "b", 8), 8)
        config.add_layer("two", {"m": {"b": 2}})
        self.assertEqual(config.get("m", "b", 7), 2)
        self.assertEqual(config.get("m", "c", None), None)
        config.define("m", "c", "x")
        self.assertEqual(config.get("m", "c", None), "x")
        config.add_layer("three", {"m": {"d": {"k": 1}}})
        config.get("m", "d")["k"] = 2
        self.assertEqual(config.get("m", "d"), {"k": 1})
        self.assertRaises(ConfigKeyError, config.get, "m", "e")
        self.assertRaises(ConfigKeyError, config.get, "m", "e")

    def test_sectionIsFresh(self):
        """
        Changing a returned section or the mapping given to C{add_layer} does not
        change the config.
        """
        mapping = {"m": {"t": {"a": 1}}}
        config = Config()
        config.add_layer("one", mapping)
        config.section("m")["t"]["a"] = 2
        mapping["m"]["t"]["a"] = 3
        self.assertEqual(config.get("m", "t"), {"a": 1})

    def test_getMissing(self):
        """
        A missing value raises L{ConfigKeyError} (a L{KeyError} too) saying how to
        set it, unless a default is given.
        """
        config = Config()
        config.add_layer("one", {"m": {"a": 1}})
        error = self.assertRaises(ConfigKeyError, config.get, "m", "b")
        self.assertIsInstance(error, KeyError)
        self.assertIsInstance(error, ConfigError)
        self.assertEqual(
            str(error),
            "no config value for m:b; set it in res/config/ionlocal.config or with -D m:b=VALUE",
        )
        self.assertEqual(config.get("m", "b", None), None)
        self.assertEqual(config.get("other", "a", default=7), 7)

    def test_getDottedKey(self):
        """
        A dotted key looks into nested dicts.
        """
        config = Config()
        config.add_layer("one", {"m": {"transfer": {"workers": 2}}})
        self.assertEqual(config.get("m", "transfer.workers"), 2)
        self.assertEqual(config.get("m", "transfer.retries", 5), 5)

    def test_defineDottedKey(self):
        """
        C{define} with a dotted key sets one value inside nested dicts.
        """
        config = Config()
        config.add_layer("one", {"m": {"transfer": {"workers": 2, "retries": 3}}})
        config.define("m", "transfer.workers", 4)
        self.assertEqual(config.section("m"), {"transfer": {"workers": 4, "retries": 3}})
        self.assertEqual(config.layers[-1], ("command line", {"m": {"transfer": {"workers": 4}}}))

    def test_defineReplacesValueWithDict(self):
        """
        Defining below a key that held a plain value makes it a dict.
        """
        config = Config()
        config.define("m", "a", 1)
        config.define("m", "a.b", 2)
        self.assertEqual(config.get("m", "a"), {"b": 2})

    def test_defineBadKey(self):
        """
        C{define} refuses an empty module or an empty part of a dotted key.
        """
        config = Config()
        self.assertRaises(ValueError, config.define, "", "a", 1)
        self.assertRaises(ValueError, config.define, "m", "a..b", 1)
        self.assertRaises(ValueError, config.define, "m", "", 1)

    def test_addLayerValidates(self):
        """
        C{add_layer} refuses anything but a dict of module names to dicts,
        naming the layer.
        """
        config = Config()
        error = self.assertRaises(ConfigError, config.add_layer, "pump.app", [1])
        self.assertEqual(
            str(error),
            "config layer 'pump.app': top level must be a dict of module names to dicts, got list",
        )
        error = self.assertRaises(ConfigError, config.add_layer, "pump.app", {"m": 5})
        self.assertEqual(str(error), "config layer 'pump.app': section 'm' must be a dict, got int")
        error = self.assertRaises(ConfigError, config.add_layer, "pump.app", {1: {}})
        self.assertIn("'pump.app'", str(error))
        self.assertEqual(config.layers, [])


class ParseDefineTests(SynchronousTestCase):
    """
    L{parse_define} reads C{-D module:key=value}.
    """

    def test_table(self):
        """
        Values that are Python literals are parsed; anything else stays a string.
        """
        cases = [
            ("ion.core.process:rpc_timeout=5", ("ion.core.process", "rpc_timeout", 5)),
            ("ion.core.messaging:broker=amqp://h", ("ion.core.messaging", "broker", "amqp://h")),
            (
                "ion.core.messaging:broker=amqp://u:p@h:5672/v",
                ("ion.core.messaging", "broker", "amqp://u:p@h:5672/v"),
            ),
            ("ion.apps.pump:transfer.workers=4", ("ion.apps.pump", "transfer.workers", 4)),
            ("m:flag=True", ("m", "flag", True)),
            ("m:ratio=0.5", ("m", "ratio", 0.5)),
            ("m:hosts=['a', 'b']", ("m", "hosts", ["a", "b"])),
            ("m:name='quoted'", ("m", "name", "quoted")),
            ("m:name=plain", ("m", "name", "plain")),
            ("m:expr=__import__('os')", ("m", "expr", "__import__('os')")),
            ("m:eq=a=b", ("m", "eq", "a=b")),
            ("m:empty=", ("m", "empty", "")),
        ]
        for text, expected in cases:
            self.assertEqual(parse_define(text), expected, text)

    def test_errors(self):
        """
        Bad syntax is a L{ValueError} showing the expected form.
        """
        cases = [
            ("nocolon=5", "missing ':'"),
            ("m:key", "missing '='"),
            ("broker=amqp://h", "missing ':'"),
            (":key=5", "empty module"),
            ("m:=5", "empty key"),
            ("m:a..b=5", "empty part"),
            ("", "missing '='"),
        ]
        for text, problem in cases:
            error = self.assertRaises(ValueError, parse_define, text)
            self.assertIn(problem, str(error), text)
            self.assertIn("module:key=value", str(error), text)
            self.assertIn(repr(text), str(error), text)

    def test_defineFromParse(self):
        """
        What C{parse_define} returns can be passed to L{Config.define}.
        """
        config = Config()
        config.add_layer("ion.config", {"ion.apps.pump": {"transfer": {"workers": 1}}})
        config.define(*parse_define("ion.apps.pump:transfer.workers=4"))
        self.assertEqual(config.get("ion.apps.pump", "transfer.workers"), 4)


RES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "res")


class SchemaTests(SynchronousTestCase):
    """
    L{Config.check} and L{Config.add_layer} hold the keys ION reads to L{SCHEMA}: a bad
    value is one line naming where it comes from, the module, the key and the value.
    """

    def test_shippedConfigFits(self):
        """
        Every key of res/config/ion.config has a schema entry, and its default fits it.
        """
        shipped = read_literal_file(os.path.join(RES, "config", "ion.config"))
        for module, section in shipped.items():
            for key, value in section.items():
                self.assertIn(key, SCHEMA.get(module, {}), f"{module}:{key}")
                self.assertIsNone(SCHEMA[module][key].check(value), f"{module}:{key}")
        Config.load(RES).check()

    def test_badDefine(self):
        """
        A -D of the wrong type or out of range names the option, module, key and value.
        """
        cases = [
            ("ion.core.process", "rpc_timeout", "abc", "must be a number > 0, got 'abc'"),
            ("ion.core.process", "rpc_timeout", 0, "must be a number > 0, got 0"),
            ("ion.core.process", "rpc_timeout", True, "must be a number > 0, got True"),
            ("ion.core.cc.agent", "missed_heartbeats", 1.5, "must be an integer > 0, got 1.5"),
            ("ion.core.messaging", "max_str_len", "lots", "must be an integer > 0, got 'lots'"),
            ("ion.core.messaging", "sysname", "", "must be a non-empty string, got ''"),
            ("ion.core.messaging", "trace", "yes", "must be True or False, got 'yes'"),
        ]
        for module, key, value, problem in cases:
            config = Config.load(RES)
            config.define(module, key, value)
            error = self.assertRaises(ConfigError, config.check)
            self.assertEqual(str(error), f"-D/--define: {module}:{key} {problem}")

    def test_goodValuesPass(self):
        config = Config.load(RES)
        for module, key, value in [
            ("ion.core.process", "rpc_timeout", 2.5),
            ("ion.core.messaging", "max_str_len", "1_000"),
            ("ion.core.messaging", "broker_ca", None),
            ("ion.core.conversation", "tombstone_ttl", 0),
            ("my.own.module", "anything", object()),
        ]:
            config.define(module, key, value)
        config.check()

    def test_badFileValueNamesTheFile(self):
        res = self.mktemp()
        write(os.path.join(res, "config", "ion.config"), "{'ion.core.process': {'rpc_timeout': 15}}")
        local = write(
            os.path.join(res, "config", "ionlocal.config"),
            "{'ion.core.process': {'rpc_timeout': '15'}}",
        )
        error = self.assertRaises(ConfigError, Config.load(res).check)
        self.assertEqual(
            str(error), f"{local}: ion.core.process:rpc_timeout must be a number > 0, got '15'"
        )

    def test_commandLineFixesFile(self):
        """
        Values are checked once merged: a -D correcting a bad file value is fine.
        """
        config = Config()
        config.add_layer("base", {"ion.core.process": {}})
        config.define("ion.core.process", "rpc_timeout", 3)
        config.add_layer("app x", {"ion.core.process": {"rpc_timeout": "abc"}})
        config.check()

    def test_addLayerChecked(self):
        """
        A layer added later (an app's config) with a bad value is refused and not added.
        """
        config = Config.load(RES)
        before = len(config.layers)
        error = self.assertRaises(
            ConfigError, config.add_layer, "app hello", {"ion.apps.hello": {"greeting": 5}}
        )
        self.assertEqual(
            str(error), "config layer 'app hello': ion.apps.hello:greeting must be a string, got 5"
        )
        self.assertEqual(len(config.layers), before)
        self.assertEqual(config.get("ion.apps.hello", "greeting", None), None)

    def test_checkWith(self):
        """
        C{check_with} checks the layers of apps about to start without adding them.
        """
        config = Config.load(RES)
        before = config.layers
        self.assertRaises(
            ConfigError, config.check_with, [("app x", {"ion.core.process": {"rpc_timeout": -1}})]
        )
        config.check_with([("app x", {"ion.core.process": {"rpc_timeout": 1}})])
        self.assertEqual(config.layers, before)

    def test_unknownModules(self):
        """
        Modules defined on the command line that nothing mentions are reported.
        """
        config = Config.load(RES)
        for module in ("nosuch.module", "ion.core.process", "ion.apps.mine", "other"):
            config.define(module, "key", 1)
        self.assertEqual(config.unknown_modules(known={"ion.apps.mine"}), ["nosuch.module", "other"])

    def test_unknownKeys(self):
        """
        A key the schema does not know in a module it knows is reported (a misspelling).
        """
        config = Config.load(RES)
        config.define("ion.core.process", "rpc_timout", 3)
        config.define("ion.core.process", "rpc_timeout", 3)
        config.define("my.module", "whatever", 1)
        self.assertEqual(config.unknown_keys(), [("ion.core.process", "rpc_timout")])
