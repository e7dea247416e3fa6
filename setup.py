"""Packaging for ION. Install with `pip install .` (twistd then finds the `cc` plugin)."""

import re

from setuptools import find_packages, setup

with open("ion/__init__.py") as f:
    version = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="ion",
    version=version,
    description="ION capability container and data pump on Twisted",
    packages=find_packages(include=["ion", "ion.*"]) + ["twisted.plugins", "ion._res"],
    # res/ (config, apps, releases) ships inside the package as ion/_res, where a container
    # started outside a checkout finds it (ion.core.cc.tap.find_res_dir).
    package_dir={"ion._res": "res"},
    package_data={
        "ion.core.messaging.amqp": ["*.xml"],
        "ion._res": ["apps/*.app", "deploy/*.rel", "config/ion.config", "config/loglevels.cfg"],
    },
    python_requires=">=3.11",
    # Exactly the distributions ion/ imports (tests/test_setup.py checks it). The tls extra
    # brings idna, without which Twisted's TLS skips the host name check; conch's brings
    # bcrypt for SFTP. No treq: see docs/ARCHITECTURE.md.
    install_requires=[
        "twisted[tls,conch]>=23.10",
        "msgpack>=1.0",
        "paho-mqtt==2.2.0",
        "attrs>=24.1",
        "automat>=22.10",
        "cryptography",
        "prometheus-client==0.26.0",
        "pyopenssl",
        "service-identity",
        "zope.interface",
    ],
    extras_require={"test": ["pika>=1.3"]},
    entry_points={"console_scripts": ["ion = ion.__main__:main"]},
)
