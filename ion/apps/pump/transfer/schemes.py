"""Scheme name -> the module that moves files over it, imported the first time a URL of the
scheme is used: sftp brings twisted.conch and cryptography, ftp twisted.protocols.ftp, and a
pump that never sees such a URL need not hold them in memory."""

import importlib
from collections.abc import Mapping


class Schemes(Mapping):
    """A read-only mapping of scheme names to their modules (L{ion.apps.pump.transfer.http},
    ...), each module imported on first lookup."""

    def __init__(self, **modules):
        self._modules = modules
        self._imported = {}

    def __getitem__(self, scheme):
        module = self._imported.get(scheme)
        if module is None:
            name = self._modules[scheme]
            module = self._imported[scheme] = importlib.import_module(
                f"ion.apps.pump.transfer.{name}"
            )
        return module

    def __contains__(self, scheme):
        return scheme in self._modules

    def __iter__(self):
        return iter(self._modules)

    def __len__(self):
        return len(self._modules)
