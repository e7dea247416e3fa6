"""An append-only file of JSON lines: the on-disk half of the pump's small stores (the duplicate
cache, the retry queue).

A store keeps its state in memory and appends one line per change here; opening it replays the
lines in order (a line that does not parse or apply, such as a torn last line after a crash, is
counted in `skipped_lines` and passed over); `rewrite` replaces the whole file with the lines of
the current state (temporary file, fsync, rename, fsync of the directory) so that the file stays
proportional to what is kept. `lines` counts the lines in the file, for the store to decide
when to rewrite.
"""

import json
import os


class Journal:
    """The JSON-lines file at `path` (see the module docstring); its directory is created."""

    def __init__(self, path):
        self.path = path
        self.lines = 0
        self.skipped_lines = 0
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._file = None

    def replay(self, apply):
        """Call `apply(record)` for each line's JSON value, in order; then open the file for
        appending. A line for which parsing or `apply` raises ValueError, KeyError or
        TypeError is skipped."""
        try:
            f = open(self.path, encoding="utf-8", errors="replace")
        except FileNotFoundError:
            pass
        else:
            with f:
                for line in f:
                    self.lines += 1
                    try:
                        apply(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        self.skipped_lines += 1
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, line, flush=True, sync=False):
        """Append `line` (text ending in a newline). Flushed to the operating system unless
        `flush` is False (then at the next flush); fsynced too with `sync`."""
        self._file.write(line)
        if flush or sync:
            self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
        self.lines += 1

    def flush(self):
        self._file.flush()

    def sync(self):
        self._file.flush()
        os.fsync(self._file.fileno())

    def rewrite(self, lines):
        """Replace the file's content with `lines` (an iterable of text lines), atomically."""
        temp = f"{self.path}.compact"
        count = 0
        with open(temp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path)
        fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._file.close()
        self._file = open(self.path, "a", encoding="utf-8")
        self.lines = count

    def close(self):
        if self._file is not None and not self._file.closed:
            self._file.close()


def json_line(record):
    """`record` as one compact JSON line."""
    return json.dumps(record, separators=(",", ":")) + "\n"
