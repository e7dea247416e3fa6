"""Twisted's TLS support (pyOpenSSL, cryptography, service_identity) loaded when a connection
first needs it, so that a container that makes no TLS connection does not carry it: about
14 MB of resident memory, a quarter of a small container's.

Twisted asks for pyOpenSSL as its reactor and a few networking modules are first imported
(C{twisted.internet.posixbase}, C{tcp}, C{endpoints}, C{twisted.web.client}) and, when it is
installed, imports all of it then. L{defer}, called by a container's entry point before its
reactor is imported, answers those optional imports, and only those, "not installed"; any other
import of pyOpenSSL (an application's own) works as usual. L{load} imports TLS support and gives
the modules that were told "not installed" what their import would have given them:
C{reactor.connectSSL} and C{listenSSL}, the TLS endpoints (C{wrapClientTLS}, C{ssl:}/C{tls:}
strings) and C{twisted.web.client}'s HTTPS policy (its methods that would raise "SSL support
unavailable" get their originals back). ION calls L{load} before each TLS connection
it makes (amqps://, https); an application that uses Twisted's TLS itself calls it first too.

One thing is not given back: C{startTLS} on a TCP connection that is already open (Twisted
builds it into its TCP transport classes when they are defined). ION wraps a connection in TLS
when it opens it and never starts TLS later.
"""

import importlib.abc
import sys

# The modules whose optional import of pyOpenSSL is answered "not installed" while deferred.
_PROBES = frozenset(
    {
        "twisted.internet.posixbase",
        "twisted.internet.tcp",
        "twisted.internet.endpoints",
        "twisted.web.client",
    }
)


class _DeferredTls(importlib.abc.MetaPathFinder):
    """Fails the import of pyOpenSSL when one of L{_PROBES} is what imports it."""

    def find_spec(self, name, path=None, target=None):
        if name != "OpenSSL" and not name.startswith("OpenSSL."):
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__") in _PROBES:
                raise ModuleNotFoundError(
                    f"{name} is loaded when TLS is first used (ion.core.lazytls)", name=name
                )
            frame = frame.f_back
        return None


_finder = _DeferredTls()
_loaded = False


def defer():
    """Defer Twisted's TLS support until L{load}, if this process has imported neither its
    reactor nor pyOpenSSL yet (a container's own process); else (a test runner, an embedding
    program) do nothing. Returns whether TLS is deferred."""
    if _loaded or "twisted.internet.reactor" in sys.modules or "OpenSSL" in sys.modules:
        return False
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    return True


def load():
    """Import Twisted's TLS support, and give it to the modules that were imported while it
    was deferred. Cheap once done; safe to call when nothing was deferred.

    @raise ImportError: pyOpenSSL or service_identity is not installed (C{twisted[tls]}).
    """
    global _loaded
    if _loaded:
        return
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    from OpenSSL import SSL
    from twisted.internet import ssl
    from twisted.internet.interfaces import IReactorSSL
    from twisted.protocols import _sni, tls
    from zope.interface import classImplements

    # The names each module's own import binds when pyOpenSSL is there; a module that got
    # them (imported before defer or after load) has its marker name set already.
    restore = {
        "twisted.internet.posixbase": ("tls", {"tls": tls, "ssl": ssl}),
        "twisted.internet.endpoints": (
            "TLSMemoryBIOFactory",
            {
                "SSLError": SSL.Error,
                "Certificate": ssl.Certificate,
                "CertificateOptions": ssl.CertificateOptions,
                "KeyPair": ssl.KeyPair,
                "PrivateCertificate": ssl.PrivateCertificate,
                "optionsForClientTLS": ssl.optionsForClientTLS,
                "trustRootFromCertificates": ssl.trustRootFromCertificates,
                "SNIConnectionCreator": _sni.SNIConnectionCreator,
                "_TLSServerEndpoint": _sni.TLSServerEndpoint,
                "autoReloadingDirectoryOfPEMs": _sni.autoReloadingDirectoryOfPEMs,
                "_TLSMemoryBIOFactory": tls.TLSMemoryBIOFactory,
                "TLSMemoryBIOFactory": tls.TLSMemoryBIOFactory,
            },
        ),
        "twisted.web.client": (
            "SSL",
            {
                "SSL": SSL,
                "CertificateOptions": ssl.CertificateOptions,
                "optionsForClientTLS": ssl.optionsForClientTLS,
                "platformTrust": ssl.platformTrust,
            },
        ),
    }
    for name, (marker, values) in restore.items():
        module = sys.modules.get(name)
        if module is None or getattr(module, marker, None) is not None:
            continue
        for key, value in values.items():
            setattr(module, key, value)
        if name == "twisted.internet.posixbase":
            classImplements(module.PosixReactorBase, IReactorSSL)
        elif name == "twisted.web.client":
            # Its HTTPS methods were replaced by ones that raise "SSL support unavailable";
            # functools.wraps kept each original as __wrapped__.
            for cls, method in [
                (module.BrowserLikePolicyForHTTPS, "creatorForNetloc"),
                (module.WebClientContextFactory, "getContext"),
            ]:
                original = getattr(cls.__dict__[method], "__wrapped__", None)
                if original is not None:
                    setattr(cls, method, original)
    _loaded = True
