"""
Tests for L{ion.apps.pump.transfer.listings}: index pages and FTP listing lines.
"""

import calendar

from twisted.trial.unittest import SynchronousTestCase

from ion.apps.pump.transfer import Entry
from ion.apps.pump.transfer.listings import parse_html_index, parse_list_line, parse_mlsd_line


def utc(*fields):
    return float(calendar.timegm(fields + (0,) * (6 - len(fields))))


APACHE_TABLE = """<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">
<html><head><title>Index of /data</title></head><body><h1>Index of /data</h1>
<table>
<tr><th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th>
<th><a href="?C=S;O=A">Size</a></th></tr>
<tr><td><a href="/">Parent Directory</a></td><td>&nbsp;</td><td align="right">  - </td></tr>
<tr><td><a href="obs%20one.txt">obs one.txt</a></td><td align="right">2024-03-05 14:07  </td>
<td align="right">1.5K</td></tr>
<tr><td><a href="radar/">radar/</a></td><td align="right">2024-03-04 09:00  </td>
<td align="right">  - </td></tr>
<tr><td><a href="tiny.dat">tiny.dat</a></td><td align="right">2024-03-05 14:08:09  </td>
<td align="right"> 17 </td></tr>
</table></body></html>
"""

APACHE_PRE = """<html><body><h1>Index of /pub</h1>
<pre><img src="/icons/blank.gif" alt="Icon "> <a href="?C=N;O=D">Name</a> <a href="?C=M;O=A">Last modified</a>
<hr><img src="/icons/back.gif" alt="[PARENTDIR]"> <a href="/">Parent Directory</a>                   -
<a href="notes.txt"><img src="/icons/text.gif" alt="[TXT]"></a> <a href="notes.txt">notes.txt</a>    2023-11-20 08:15  2.0M
<img src="/icons/folder.gif" alt="[DIR]"> <a href="old/">old/</a>         2023-11-19 23:59    -
</pre></body></html>
"""

NGINX = """<html><head><title>Index of /feed/</title></head><body><h1>Index of /feed/</h1><hr><pre>
<a href="../">../</a>
<a href="bulletins/">bulletins/</a>                                   05-Mar-2024 14:07        -
<a href="a%26b.grib2">a&amp;b.grib2</a>                              05-Mar-2024 14:08   123456
<a href="https://elsewhere.example.org/x">x</a>
<a href="/feed/abs.txt">abs.txt</a>                                   06-Mar-2024 00:00        9
</pre><hr></body></html>
"""

TWISTED = """<table>
<thead><tr><th>Filename</th><th>Size</th><th>Content type</th><th>Content encoding</th></tr></thead>
<tbody>
<tr class="odd"><td><a href="big.bin">big.bin</a></td><td>2M</td><td>[application/octet-stream]</td><td></td></tr>
<tr class="even"><td><a href="small.txt">small.txt</a></td><td>5B</td><td>[text/plain]</td><td></td></tr>
<tr class="odd"><td><a href="sub/">sub/</a></td><td></td><td>[Directory]</td><td></td></tr>
</tbody></table>
"""


class HTMLIndexTests(SynchronousTestCase):
    """
    L{parse_html_index} reads the index pages of common servers.
    """

    def test_scanners_agree(self):
        """
        The regular expressions that read a large page quickly find the links and the text
        after each that html.parser finds, on every server's page and on broken markup.
        """
        from ion.apps.pump.transfer.listings import _IndexScanner, scan_links

        broken = NGINX.replace('<a href="bulletins/">', '<a href="bulletins/"').replace(
            "</pre>", "< /pre>"
        )
        odd = (
            '<a href="x">in <b>bold</b></a> 1 <a href="y" >y</a>2<a href=\'z\'>z</a>3'
            '<A HREF="u">u</A>4<a href="v">a>b</a>5<a href="w&amp;x">w</a>&lt;6<a href="">e</a>'
            '<tr><a href="q">q</a></tr>after<!-- c --><a href="r">r'
        )
        pages = (APACHE_TABLE, APACHE_PRE, NGINX, TWISTED, broken, "", "<a href=x>", odd)
        pages += ('<!-- <a href="c">c</a> --><a href="d">d</a> 1',)
        for page in pages:
            scanner = _IndexScanner()
            scanner.feed(page)
            scanner.close()
            self.assertEqual(
                [(href, "".join(after)) for href, after in scan_links(page)],
                [(href, "".join(after)) for href, after in scanner.links],
                page,
            )

    def test_details_read_at_once(self):
        """
        The date and size after a link, read at once in the usual layout, are what reading
        them one after the other finds, whatever the text.
        """
        import random

        from ion.apps.pump.transfer import listings

        rng = random.Random(21)
        pieces = ["05-Mar-2024 14:07", "2024-03-05 14:08:09", "2024-03-05T14:08", "1-Jan-1970",
                  " ", "  ", "\t", "\n", "-", "17", "0017", "17B", "1.5K", "2M", "x", "1",
                  "6-Foo-2024 10:00", "\u0663", "\xa0"]
        texts = ["   05-Mar-2024 14:07   123456\n", "  2024-03-05 14:07  - ", "2024-03-05 14:07 7b"]
        texts += ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 6)))
                  for _ in range(20000)]
        for text in texts:
            mtime, rest = listings._html_mtime(text)
            self.assertEqual(listings._html_details(text), (mtime, listings._html_size(rest)),
                             repr(text))

    def test_apacheTable(self):
        """
        Apache's table layout: dates, rounded sizes (None) and exact ones; sort and parent
        links skipped; names percent-decoded.
        """
        entries = parse_html_index(APACHE_TABLE, "http://h/data/")
        self.assertEqual(
            entries,
            [
                Entry("obs one.txt", None, utc(2024, 3, 5, 14, 7), None, "file"),
                Entry("radar", None, utc(2024, 3, 4, 9, 0), None, "dir"),
                Entry("tiny.dat", 17, utc(2024, 3, 5, 14, 8, 9), None, "file"),
            ],
        )

    def test_apachePre(self):
        """
        Apache's fancy C{<pre>} layout, with icons that link to the file too.
        """
        entries = parse_html_index(APACHE_PRE, "http://h/pub")
        self.assertEqual(
            entries,
            [
                Entry("notes.txt", None, utc(2023, 11, 20, 8, 15), None, "file"),
                Entry("old", None, utc(2023, 11, 19, 23, 59), None, "dir"),
            ],
        )

    def test_nginx(self):
        """
        nginx's autoindex: exact sizes; links elsewhere skipped; absolute links to children
        kept.
        """
        entries = parse_html_index(NGINX, "https://h/feed/")
        self.assertEqual(
            entries,
            [
                Entry("bulletins", None, utc(2024, 3, 5, 14, 7), None, "dir"),
                Entry("a&b.grib2", 123456, utc(2024, 3, 5, 14, 8), None, "file"),
                Entry("abs.txt", 9, utc(2024, 3, 6), None, "file"),
            ],
        )

    def test_twisted(self):
        """
        twisted.web's listing: sizes exact only in bytes, no dates.
        """
        entries = parse_html_index(TWISTED, "http://h/files/")
        self.assertEqual(
            entries,
            [
                Entry("big.bin", None, None, None, "file"),
                Entry("small.txt", 5, None, None, "file"),
                Entry("sub", None, None, None, "dir"),
            ],
        )

    def test_noListing(self):
        """
        A page without child links lists nothing.
        """
        self.assertEqual(parse_html_index("<p>hello <a href='/'>home</a></p>", "http://h/d/"), [])


class FTPListTests(SynchronousTestCase):
    """
    L{parse_list_line} reads Unix and DOS C{LIST} lines; L{parse_mlsd_line} reads C{MLSD}.
    """

    now = utc(2024, 6, 1)

    def test_unixFile(self):
        """
        A file with a time of day is dated this year; permissions become the mode.
        """
        line = "-rw-r--r--    1 1000     1000       123456 Mar 05 14:07 file one.txt"
        self.assertEqual(
            parse_list_line(line, self.now),
            Entry("file one.txt", 123456, utc(2024, 3, 5, 14, 7), 0o644, "file"),
        )

    def test_unixDirectoryWithYear(self):
        """
        A year instead of a time means midnight that day.
        """
        line = "drwxr-sr-x    2 ftp      ftp          4096 Dec 31  2022 archive"
        self.assertEqual(
            parse_list_line(line, self.now),
            Entry("archive", None, utc(2022, 12, 31), 0o2755, "dir"),
        )

    def test_unixLinkLastYear(self):
        """
        A link's target is dropped; a time of day later than now means last year.
        """
        line = "lrwxrwxrwx    1 ftp      ftp            11 Jun 12 03:04 latest -> file one.txt"
        self.assertEqual(
            parse_list_line(line, self.now),
            Entry("latest", None, utc(2023, 6, 12, 3, 4), 0o777, "link"),
        )

    def test_twistedServer(self):
        """
        The layout of twisted's own FTP server (owner and group padded, year right-aligned).
        """
        line = "-rw-r--r--   1 0         0                       5 Jan 02  2020 small.txt"
        self.assertEqual(
            parse_list_line(line, self.now), Entry("small.txt", 5, utc(2020, 1, 2), 0o644, "file")
        )

    def test_noEntry(self):
        """
        Totals, devices and garbage name no entry.
        """
        for line in ("total 12", "crw-rw-rw-   1 root root 1, 3 Jan 01 2020 null", "", "hello"):
            self.assertIsNone(parse_list_line(line, self.now), line)

    def test_dos(self):
        """
        The DOS/IIS layout, 12-hour clock.
        """
        self.assertEqual(
            parse_list_line("03-05-24  02:07PM              1234 report.csv", self.now),
            Entry("report.csv", 1234, utc(2024, 3, 5, 14, 7), None, "file"),
        )
        self.assertEqual(
            parse_list_line("03-05-24  12:30AM       <DIR>          old", self.now),
            Entry("old", None, utc(2024, 3, 5, 0, 30), None, "dir"),
        )

    def test_mlsd(self):
        """
        MLSD facts give exact size, mtime (with fraction) and mode; cdir/pdir are skipped.
        """
        self.assertEqual(
            parse_mlsd_line("type=file;size=1024;modify=20240305140700.5;UNIX.mode=0644; a b.txt"),
            Entry("a b.txt", 1024, utc(2024, 3, 5, 14, 7) + 0.5, 0o644, "file"),
        )
        self.assertEqual(
            parse_mlsd_line("Type=dir;Modify=20240305140700; sub"),
            Entry("sub", None, utc(2024, 3, 5, 14, 7), None, "dir"),
        )
        self.assertEqual(parse_mlsd_line("type=OS.unix=symlink;size=3; ln").type, "link")
        self.assertIsNone(parse_mlsd_line("type=cdir;modify=20240305140700; ."))
        self.assertIsNone(parse_mlsd_line("garbage"))
