"""The sender: push the files that notices announce to a destination server (sr3's sender).

A L{Sender} is a consumer (L{ion.apps.pump.consumer}) whose delivery step sends instead of
storing: it consumes C{q_<user>.sender.<name>} bound to C{exchange} (default C{xpublic}) with
C{topics}, filters, suppresses duplicates, reports every outcome to the source and retries
transient failures through the same on-disk retry queue; what differs is where a file goes.
For each file notice:

  1. its relPath is placed under C{destination} (C{sftp://user@host/dir/}, C{ftp://host/dir/},
     C{file:dir/}, C{http(s)://host/dir/}) by the same rules as a consumer's directory
     (C{mirror} default, or C{strip}: N), every component passing the relPath safety rules;
  2. the file is read from the notice's URL: a C{file:} URL (a watch or C{ion post} on this
     machine) is read in place, what the subscription's URL policy allows (C{sources}); any
     other URL is fetched and verified into C{<state_dir>/staging} first;
  3. it is sent with the transfer library's put: written to a temporary name and renamed
     into place on sftp, ftp and file (a reader at the destination never sees part of it),
     a PUT on http(s); the bytes sent are checked against the notice's sha512 identity. A
     file of at least C{block_threshold} bytes goes to sftp and ftp in blocks, resumed after
     a kill or a cut from a record in C{<state_dir>/blocks}
     (L{ion.apps.pump.transfer.sendblocks});
  4. with C{post_exchange}, the file is announced there as sent (baseUrl C{destination},
     relPath where it went, identity sha512) before the 201 report: sr3's post_exchange.

With C{broker} (and optionally C{queue}), the notices come from that broker, through the
sender's own connection, as a consumer's do (L{ion.apps.pump.flow}); its reports go to
C{xs_<login>} there. C{post_exchange} announcements go to the container's broker.

File operations (C{fileOp}) are carried out at the destination as C{events} allows: under
a C{file:} destination's directory (L{ion.apps.pump.fileops}), or on the sftp or ftp server
(rename, remove, mkdir, rmdir; links on sftp only); http(s) refuses them (422). On sftp and
ftp, missing directories are made, and the size of a file sent is checked on the server.

A destination that cannot be reached (a connection failure, 503) takes the sender's link
down: the file waits in the retry queue and the link is tried again in bursts (C{retry_burst}
tries C{retry_burst_gap} seconds apart, then C{retry_pause}), one file at a time, the others
waiting for its outcome; none is given up while the link is down (L{ion.apps.pump.link}).
sftp and ftp sessions stay open between files for C{dead_time} seconds
(L{ion.apps.pump.transfer.sessions}); C{heartbeat} and C{heartbeat_remote} are described in
L{ion.apps.pump.heartbeat}.

Args: L{ion.apps.pump.args.SenderArgs}; state in C{state_dir} (default
C{var/pump/sender-<name>}).
"""

import hashlib
import os
from urllib.parse import quote, unquote, urlsplit

from twisted.internet import defer, threads

from ion.apps.pump import fileops, paths
from ion.apps.pump.args import SenderArgs
from ion.apps.pump.consumer import Consumer
from ion.apps.pump.outcome import Failure, classify
from ion.apps.pump.poll import local_directory
from ion.apps.pump.transfer import ChecksumMismatch, TransferError
from ion.apps.pump.transfer.inflight import DestinationRoot
from ion.apps.pump.transfer.sendblocks import sweep_records
from ion.core.log import redact

# The failure reported for a notice of one block (announced with block_size / blocksize).
BLOCK_NOTICE = "a sender takes whole-file notices, not one block of a file announced in blocks"

# The directory (in the state_dir, or shared_dir) of the records of puts in blocks.
BLOCK_RECORDS = "blocks"


class Sender(Consumer):
    """Notices in, files sent to C{destination}, reports out (see the module docstring)."""

    kind = "sender"

    def on_init(self):
        sender = self.sender = SenderArgs.parse(self.args)
        state_dir = self.args.get("state_dir") or os.path.join(
            "var", "pump", f"sender-{sender.name}"
        )
        consumer_args = SenderArgs.consumer_args(dict(self.args, state_dir=state_dir),
                                                 os.path.join(state_dir, "staging"))
        if sender.post_exchange is not None:
            consumer_args["reannounce"] = {
                "exchange": sender.post_exchange, "base_url": sender.destination,
            }
        self.args = consumer_args
        super().on_init()
        self.label = sender.who
        self.destination = sender.destination
        self.events = set(sender.events)
        local = local_directory(self.destination)
        self.target_root = None if local is None else DestinationRoot(local, make=True)
        # Where the records of the puts in blocks are kept (shared by the instances).
        self.record_dir = os.path.join(
            self.settings.shared_dir or self.state_dir, BLOCK_RECORDS
        )

    async def on_activate(self):
        await super().on_activate()
        if self.transfers is not None:
            sweeping = self._thread(sweep_records, self.record_dir)
            sweeping.addCallbacks(self._records_swept, self._sweep_failed)

    def _records_swept(self, removed):
        if removed:
            self.log.info(
                "{name}: removed {n} block records of sends given up on",
                name=self.label, n=len(removed),
            )

    def _close_transfers(self):
        if self.target_root is not None:
            self.target_root.close()
        return super()._close_transfers()

    def _thread(self, function, *args):
        return threads.deferToThreadPool(
            self.container.reactor, self.transfers.pool, function, *args
        )

    async def _operate(self, op, parts, old, target):
        """A file operation at the destination: under a file: destination's root, else on
        the sftp or ftp server (a hard link nowhere but file:)."""
        if self.target_root is not None:
            return await self._thread(fileops.apply, self.target_root, op, parts, old, target)
        if op == "hlink":
            raise TransferError(f"no hard links on {self.destination}", code=422)
        url = self.destination + quote("/".join(parts))
        base = unquote(urlsplit(self.destination).path)
        old_path = None if old is None else base + "/".join(old)
        return await self.transfers.operate(url, op, old=old_path, target=target)

    def destination_for(self, notice):
        """The URL a notice's file is sent to; raises paths.UnsafePath."""
        if notice.retrieve_path:
            super().destination_for(notice)
        return self.destination + quote("/".join(self.placed(notice)))

    async def _fetch(self, notice, url, target, access=None):
        """(TransferResult of the put, None) once the file is at C{target}, else (None,
        outcome.Failure)."""
        if "blocks" in notice:
            # One block of a file announced in blocks: a sender sends whole files only (its own
            # blocks are its choice, L{ion.apps.pump.transfer.sendblocks}), and a block's
            # identity cannot check the whole file sent. Refused, never half sent.
            return None, Failure(422, BLOCK_NOTICE)
        blocked = self.link.blocked()
        if blocked is not None:
            return None, blocked  # nothing staged for a link that will not be tried
        source = local_directory(url) if url.startswith("file://") else None
        staged = None
        try:
            if source is None:
                name = hashlib.sha256(target.encode("utf-8")).hexdigest()
                staged = os.path.join(self.real_directory, name)
                result, failure = await super()._fetch(notice, url, staged, access)
                if failure is not None:
                    return None, failure
                source = staged
            return await self.link.attempt(lambda: self._send(notice, url, source, target))
        except paths.UnsafePath as e:
            return None, Failure(422, str(e))
        except Exception as e:
            return None, classify(e)
        finally:
            if staged is not None:
                await self._thread(_remove, staged)

    async def _send(self, notice, url, source, target):
        """(TransferResult, None) once the local file C{source} is at C{target}, else (None,
        outcome.Failure)."""
        try:
            if self.target_root is not None:
                parts = self.placed(notice)
                if len(parts) > 1:
                    await self._thread(fileops.apply, self.target_root, "mkdir", parts[:-1])
            identity = notice.identity or {}
            sending = defer.Deferred.fromCoroutine(self.transfers.put(
                source, target, blocks=self.settings.blocks, record_dir=self.record_dir,
                version=identity.get("value"),
            ))
            sending.addTimeout(self.settings["transfer_timeout"], self.container.clock)
            result = await sending
            sent = result.checksum.get("sha512")
            if identity.get("method") == "sha512" and sent and sent != identity["value"]:
                raise ChecksumMismatch(f"{url}: the file sent is not the one announced")
            return result, None
        except defer.TimeoutError:
            return None, Failure(504, f"send not done after {self.settings['transfer_timeout']} s")
        except paths.UnsafePath as e:
            return None, Failure(422, str(e))
        except Exception as e:
            return None, classify(e)

    async def _given_up(self, notice, url):
        """A put in blocks of a file given up for good leaves nothing behind: its temporary
        file at the destination and its record are removed (best effort)."""
        size = notice.size
        if self.transfers is None or self.target_root is not None or not size:
            return
        try:
            await self.transfers.forget_put(
                self.destination_for(notice), size, blocks=self.settings.blocks,
                record_dir=self.record_dir, version=(notice.identity or {}).get("value"),
            )
        except Exception as e:
            self.log.warn(
                "{name}: cannot remove what the put in blocks of {url} left: {why}",
                name=self.label, url=url, why=classify(e).message,
            )

    async def op_stats(self, content, headers):
        """A consumer's stats (L{Consumer.op_stats}); C{transfers} also lists the files being
        sent in blocks: C{received} (the bytes the destination took so far), C{size} and
        their C{blocks} progress (C{3/16 blocks, 1.2 GiB of 4.0 GiB})."""
        stats = await super().op_stats(content, headers)
        sending = () if self.transfers is None else self.transfers.sending
        stats["transfers"] = list(stats["transfers"]) + [
            {"file": redact(state.what), "received": state.size, "size": state.expected_size,
             "blocks": state.progress()}
            for state in sending
        ]
        return stats

    # The link's state follows the sends (L{Link.attempt}), not the staging fetches.
    pushes_heartbeats = True
    writes_below_root = False  # its files go to the destination URL

    def _note_link(self, failure):
        pass

    def _retry_due(self, failure):
        """A file whose link is down is due at the link's next try (retry bursts)."""
        if failure.code == 503 and self.link.state == "down":
            return self.link.due()
        return None

    async def _push_heartbeat(self, path):
        """Put the heartbeat file at the destination, when the link is not down."""
        if self.transfers is None or self.link.state == "down":
            return
        await self.transfers.put(path, self.destination + quote(os.path.basename(path)))

    async def _reannounce(self, notice, target, result):
        """Announce the file sent on C{post_exchange}, as found at the destination."""
        announced = notice.copy()
        announced.base_url = self.destination.rstrip("/")
        announced.rel_path = "/".join(self.placed(notice))
        announced.retrieve_path = None
        announced.report = None
        sha512 = result.checksum.get("sha512")
        if sha512:
            announced.identity = {"method": "sha512", "value": sha512}
        exchange = self.settings["reannounce"]["exchange"]
        await self._publish(exchange, announced.topic(), announced.to_json())


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


process_class = Sender
