"""Twisted's TLS support loaded on first use (ion.core.lazytls): a container that makes no TLS
connection does not load pyOpenSSL or cryptography, and one that does gets all of Twisted's
TLS. Each test runs a fresh Python (a reactor imported with TLS deferred) as a subprocess."""

import json
import os
import subprocess
import sys

from twisted.internet import threads
from twisted.trial import unittest

from tests.broker import make_certificates
from tests.core.cc.test_tap import ROOT, TWISTD

TLS_MODULES = ("OpenSSL", "cryptography", "service_identity")

# Deferred, then loaded: a TLS server (reactor.listenSSL) and two TLS clients (an endpoint
# wrapped by endpoints.wrapClientTLS, with twisted.web.client's HTTPS policy for one of them)
# on loopback, each client reading the server's greeting.
LOADED = """
import json, sys
from ion.core import lazytls
deferred = lazytls.defer()
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.web import client
before = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))
lazytls.load()
from twisted.internet import ssl

def pem(name):
    with open(f"{sys.argv[1]}/{name}", "rb") as f:
        return f.read()

class Greet(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hello over TLS")

class Read(protocol.Protocol):
    def connectionMade(self):
        self.got = b""

    def dataReceived(self, data):
        self.got += data
        if self.got == b"hello over TLS":
            self.transport.loseConnection()
            self.factory.done.callback(self.got.decode())

ca = ssl.Certificate.loadPEM(pem("ca.pem"))
server = ssl.PrivateCertificate.loadPEM(pem("server.pem") + pem("server.key"))
greet = protocol.Factory.forProtocol(Greet)
port = reactor.listenSSL(0, greet, server.options(), interface="127.0.0.1").getHost().port

async def read(creator):
    factory = protocol.Factory.forProtocol(Read)
    factory.done = defer.Deferred()
    plain = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoints.wrapClientTLS(creator, plain).connect(factory)
    return await factory.done

async def main(reactor):
    policy = client.BrowserLikePolicyForHTTPS(trustRoot=ca)
    got = [await read(ssl.optionsForClientTLS("localhost", trustRoot=ca)),
           await read(policy.creatorForNetloc(b"localhost", port))]
    print(json.dumps({"deferred": deferred, "before": before, "got": got}))

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


def tls_modules_in(text):
    return sorted({line.split(".")[0] for line in text.split()} & set(TLS_MODULES))


class LazyTlsTests(unittest.TestCase):
    def test_loaded_gives_twisted_all_its_tls(self):
        """A reactor, endpoints and web client imported with TLS deferred hold no pyOpenSSL;
        once TLS is loaded, reactor.listenSSL serves and wrapClientTLS connects, with
        optionsForClientTLS and with twisted.web.client's HTTPS policy, verifying the
        server's certificate."""
        folder = os.path.abspath(self.mktemp())
        make_certificates(folder, "tess")
        result = subprocess.run(
            [sys.executable, "-c", LOADED, folder, *TLS_MODULES],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            json.loads(result.stdout),
            {"deferred": True, "before": [], "got": ["hello over TLS", "hello over TLS"]},
        )

    def test_own_import_of_openssl_works(self):
        """While TLS is deferred, an application's own import of pyOpenSSL works as usual."""
        script = (
            "from ion.core import lazytls; lazytls.defer()\n"
            "from twisted.internet import reactor, endpoints\n"
            "from OpenSSL import SSL; print(SSL.Context.__name__)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual((result.returncode, result.stdout), (0, "Context\n"), result.stderr)

    async def test_pump_on_file_urls_loads_no_tls(self):
        """`twistd -n cc` running the pump app with file: URLs only (a poll and a
        subscription) delivers a file without loading pyOpenSSL, cryptography or
        service_identity."""
        work = os.path.abspath(self.mktemp())
        source = os.path.join(work, "source")
        os.makedirs(source)
        with open(os.path.join(source, "a.txt"), "w") as f:
            f.write("hello\n")
        pump = {
            "type": "application", "name": "pump", "description": "pump on file: URLs",
            "version": "0.1", "applications": ["ioncore"], "registered": [],
            "mod": ("ion.apps.pump.app", [], {
                "polls": [{"name": "source", "url": f"file:{source}/", "interval": 0.2}],
                "subscriptions": [{"name": "pump", "exchange": "xpublic", "topics": ["v03.#"],
                                   "directory": os.path.join(work, "destination"),
                                   "mirror": True}],
            }),
        }
        probe = {
            "type": "application", "name": "modules", "description": "writes sys.modules",
            "version": "0.1", "applications": ["pump"], "registered": [],
            "mod": ("tests.core.test_lazytls", [], {"work": work}),
        }
        for name, app in [("pump", pump), ("modules", probe)]:
            with open(os.path.join(work, f"{name}.app"), "w") as f:
                f.write(repr(app))
        cmd = [*TWISTD, "--pidfile=", "-n", "cc", "--no-shell", "-D", "ion.core.cc:web=None",
               os.path.join(work, "pump.app"), os.path.join(work, "modules.app")]
        result = await threads.deferToThread(
            subprocess.run, cmd, cwd=work, env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        with open(os.path.join(work, "destination", "a.txt")) as f:
            self.assertEqual(f.read(), "hello\n")
        with open(os.path.join(work, "modules.txt")) as f:
            modules = f.read()
        self.assertIn("ion.apps.pump.transfer.file", modules.split(), result.stdout)
        self.assertEqual(tls_modules_in(modules), [])


async def start(container, app, work):
    """The `modules` app of L{LazyTlsTests.test_pump_on_file_urls_loads_no_tls}: once the
    pump has delivered its file, writes the container's module names to C{work}/modules.txt
    and stops the container."""
    from twisted.internet import task

    from ion.core.process import Process

    class Modules(Process):
        async def on_activate(self):
            self._watch = task.LoopingCall(self._check)
            self._watch.clock = self.container.reactor
            self._watch.start(0.1)

        def _check(self):
            if not os.path.exists(os.path.join(work, "destination", "a.txt")):
                return
            self._watch.stop()
            with open(os.path.join(work, "modules.txt"), "w") as f:
                f.write("\n".join(sorted(sys.modules)))
            self.container.reactor.callLater(0, self.container.reactor.stop)

    return await container.spawn(Modules, name="modules")
