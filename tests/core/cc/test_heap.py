"""The garbage collector's settings of a booted container process."""

import gc
import weakref

from twisted.trial.unittest import SynchronousTestCase

from ion.core.cc import heap


class _Node:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it


class SettleTests(SynchronousTestCase):
    def setUp(self):
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        self.addCleanup(gc.unfreeze)

    def test_boot_objects_set_apart(self):
        """What is alive when the process settles is left out of the collector's passes, and
        the young objects are looked at every YOUNG_THRESHOLD allocations from then on."""
        booted = _Node()
        heap.settle()
        for generation in range(3):
            self.assertFalse(any(o is booted for o in gc.get_objects(generation)))
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold()[0], heap.YOUNG_THRESHOLD)

    def test_later_cycles_collected(self):
        """A cycle of garbage made after settling is still collected by the collector's own
        passes: at the latest once YOUNG_THRESHOLD more objects are alive."""
        heap.settle()
        node = _Node()
        freed = weakref.ref(node)
        del node
        kept = [[] for _ in range(heap.YOUNG_THRESHOLD + 1)]
        self.assertIsNone(freed())
        self.assertEqual(len(kept), heap.YOUNG_THRESHOLD + 1)
