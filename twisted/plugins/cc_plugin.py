"""twistd plugin: `twistd -n cc [options] [app/rel files]` starts an ION capability container."""

from twisted.application.service import ServiceMaker

cc = ServiceMaker(
    "ION capability container",
    "ion.core.cc.tap",
    "Start an ION capability container with the given .app/.rel files.",
    "cc",
)
