"""Accept/reject rules: the first full match decides."""

from twisted.trial import unittest

from ion.apps.pump.filters import Filter


class FilterTests(unittest.SynchronousTestCase):
    def test_first_match_wins(self):
        """Rules are tried in order against the whole URL; the first that matches decides."""
        f = Filter(
            [
                ("reject", r".*/secret/.*"),
                ("accept", r".*\.grib2"),
                ("reject", r".*\.txt"),
                ("accept", r".*/public/.*"),
            ]
        )
        table = [
            ("http://h/public/a.grib2", True),
            ("http://h/secret/a.grib2", False),
            ("http://h/public/a.txt", False),
            ("http://h/public/a.csv", True),
            ("http://h/other/a.csv", True),  # unmatched: accepted by default
        ]
        for url, accepted in table:
            self.assertEqual(f.accepts(url), accepted, url)

    def test_fullmatch_is_anchored(self):
        """A regex must match the whole URL, not a part of it."""
        f = Filter([("accept", r"grib2")], accept_unmatched=False)
        self.assertFalse(f.accepts("http://h/a.grib2"))
        self.assertTrue(Filter([("accept", r".*grib2")], False).accepts("http://h/a.grib2"))

    def test_unmatched_default(self):
        """URLs matching no rule are accepted unless accept_unmatched is False."""
        self.assertTrue(Filter([("reject", r".*x")]).accepts("http://h/y"))
        self.assertFalse(Filter([("accept", r".*x")], False).accepts("http://h/y"))
        self.assertTrue(Filter([]).accepts("http://h/y"))

    def test_two_lists(self):
        """With separate accept and reject lists, rejects are tried first."""
        f = Filter.from_args(accept=[r".*\.dat"], reject=[r".*/tmp/.*"], accept_unmatched=False)
        self.assertTrue(f.accepts("http://h/a/f.dat"))
        self.assertFalse(f.accepts("http://h/tmp/f.dat"))
        self.assertFalse(f.accepts("http://h/a/f.txt"))

    def test_bad_rules(self):
        """Bad rules are refused when the consumer starts, naming the rule."""
        for rules, text in [
            ([("maybe", ".*")], "action"),
            ([("accept", "(")], "bad regex"),
            (["accept"], "rule 0"),
        ]:
            e = self.assertRaises(ValueError, Filter, rules)
            self.assertIn(text, str(e))
        self.assertRaises(ValueError, Filter.from_args, [("accept", ".*")], accept=[".*"])
