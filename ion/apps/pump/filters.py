"""Accept/reject rules for the pump: which URLs a subscription takes, which files a poll
announces.

A rule is C{('accept'|'reject', regex)}; the regex must match the whole string (a URL for a
consumer, a relPath for a poll), and the first rule that matches decides.
"""

import re


class Filter:
    """Accept/reject rules: the first rule whose regex matches the whole string decides; a
    string no rule matches is accepted when C{accept_unmatched} (the default). ValueError,
    naming C{who} and the rule, for a malformed rule."""

    def __init__(self, rules=(), accept_unmatched=True, who="filter"):
        self.rules = []
        for index, rule in enumerate(rules):
            if not isinstance(rule, (list, tuple)) or len(rule) != 2:
                raise ValueError(
                    f"{who}: rule {index} must be ('accept'|'reject', regex), got {rule!r}"
                )
            action, pattern = rule
            if action not in ("accept", "reject"):
                raise ValueError(
                    f"{who}: rule {index} action must be 'accept' or 'reject', got {action!r}"
                )
            if not isinstance(pattern, str):
                raise ValueError(f"{who}: rule {index} regex must be a string, got {pattern!r}")
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{who}: rule {index} ({action} {pattern!r}): bad regex: {e}")
            self.rules.append((action == "accept", regex))
        self.accept_unmatched = bool(accept_unmatched)

    @classmethod
    def from_args(cls, filters=None, accept=None, reject=None, accept_unmatched=True, who="filter"):
        """The rules of C{filters} (ordered pairs), or of C{reject} then C{accept} (two lists).
        C{accept_unmatched} None: unmatched strings are accepted only when no rule accepts
        (naming what to accept means the rest is not wanted)."""
        if filters is not None and (accept is not None or reject is not None):
            raise ValueError(f"{who}: give either filters or accept/reject lists, not both")
        if filters is None:
            filters = []
            for action, patterns in (("reject", reject), ("accept", accept)):
                if patterns is None:
                    continue
                if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
                    raise ValueError(f"{who}: {action} must be a list of regexes, got {patterns!r}")
                filters.extend((action, pattern) for pattern in patterns)
        elif not isinstance(filters, (list, tuple)):
            raise ValueError(f"{who}: filters must be a list of (action, regex), got {filters!r}")
        rules = cls(filters, True, who)
        if accept_unmatched is None:
            accept_unmatched = not any(accept for accept, _ in rules.rules)
        rules.accept_unmatched = bool(accept_unmatched)
        return rules

    @property
    def accepts_everything(self):
        """Whether every string is accepted (no rules, and unmatched ones are accepted)."""
        return not self.rules and self.accept_unmatched

    def accepts(self, text):
        for accept, regex in self.rules:
            if regex.fullmatch(text):
                return accept
        return self.accept_unmatched
