"""What a transfer returns: the outcome of a get, and the entries of a directory listing."""

import stat

import attrs


@attrs.frozen
class TransferResult:
    """
    A file delivered by C{get} (or C{put} to a local file).

    @ivar size: bytes written.
    @ivar checksum: C{{method: base64 digest}} for every method computed while streaming.
    @ivar mtime: the modification time applied (seconds since the epoch), or C{None}.
    @ivar mode: the permission bits applied, or C{None} when the source did not say.
    @ivar path: the final path.
    @ivar blocks: how many blocks the file was fetched in (0: in one stream).
    @ivar complete: false for the result of one block of an sr3 block notice when the
        file still lacks others (C{size} is then the block's).
    """

    size: int
    checksum: dict
    mtime: float | None
    mode: int | None
    path: str
    blocks: int = 0
    complete: bool = True


@attrs.frozen
class Entry:
    """
    One name in a remote directory.

    @ivar type: C{'file'}, C{'dir'} or C{'link'}.
    @ivar size: bytes, or C{None} when the listing gives none or only a rounded one.
    @ivar mtime: seconds since the epoch, or C{None}; as precise as the listing format.
    @ivar mode: permission bits, or C{None}.
    """

    name: str
    size: int | None
    mtime: float | None
    mode: int | None
    type: str


class Listing(list):
    """The L{Entry} values of one directory listing, and in C{bytes} how many bytes the
    listing took to read from the server: the index page (http), the C{LIST}/C{MLSD} data
    (ftp), the names and long names of the C{READDIR} replies (sftp); 0 for a local
    directory, whose listing moves nothing over a link.

    C{digest}: for an index page (http), L{ion.apps.pump.transfer.listings.page_digest} of
    what was read, else None. C{unchanged}: true when the listing was asked for C{unless} that
    digest and the page had it: then it holds no entries (the page was not parsed)."""

    def __init__(self, entries=(), bytes=0, digest=None, unchanged=False):
        super().__init__(entries)
        self.bytes = bytes
        self.digest = digest
        self.unchanged = unchanged


def entry_type(mode):
    """The L{Entry} type of a file with C{mode}: C{'link'}, C{'dir'}, C{'file'}, or C{None}
    for what is none of them (devices, fifos, sockets), which listings leave out."""
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else None
