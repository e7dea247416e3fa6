"""Loaded by the sr3 processes of the MQTT interop tests (tests/apps/pump/sr3.py): sr3 3.3.1's
MQTT publisher uses the copy module without importing it, so it is made a builtin here."""

import builtins
import copy

builtins.copy = copy
