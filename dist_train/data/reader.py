"""Reading chosen samples of tar shards, local or remote, without decoding the ones skipped.

Shards are opened through webdataset's ``gopen`` (local paths, ``http(s)://`` through ``curl``, ``pipe:``
commands), and their members grouped into samples by webdataset's key rule (``base_plus_ext``). The tar
walk is our own: webdataset's ``tar_file_iterator`` reads every member's bytes, while skipping to an
offset must not. On a local file a skipped sample costs a header read and a seek, about 20 us; from a
stream its bytes are read and dropped, but never decoded. A reader keeps one shard open and moves
forward through it, so consecutive requests in one shard cost one pass; going back reopens it.

A shard that cannot be opened or read is retried (``retries`` times, 1 s then 2 s apart, each reopening it
at the offset where the read stopped), then ``ShardReadError`` says which shard, from where, and what to do.
"""

from __future__ import annotations

import logging
import tarfile
import time
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

from dist_train.data.errors import ShardsNotFound

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (1.0, 2.0)


class ShardReadError(IOError):
    """A shard could not be read (missing, unreachable, truncated); the message names it and the fix."""


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def open_url(url: str) -> IO[bytes]:
    """A readable byte stream of ``url``: a local path, ``http(s)://...`` (curl) or ``pipe:command``."""
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def close_quietly(stream: Any) -> None:
    """Close ``stream``; a pipe (curl) stopped mid-transfer is killed, not waited on for its exit status."""
    proc = getattr(stream, "proc", None)
    try:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            stream.stream.close()
        else:
            stream.close()
    except OSError:
        pass


def load_manifest(shards: str, shard_url: str = "", *, allow_pipe_from_remote_manifest: bool = False) -> dict:
    """The manifest of a run's shards (``data.shards``, ``data.shard_url``). Local shards: ``shards/manifest.json``,
    every shard beside it. Remote shards: the local ``manifest.json`` alone if there is one, else the one
    at ``shard_url`` with ``{name}`` = ``manifest.json``; the shards are not looked for on local disk.

    Shard names are checked (``shards.SAFE_SHARD_NAME``) wherever the manifest comes from. A ``pipe:`` template
    (a shell command) with a manifest fetched through it is refused unless allowed: the store would then decide
    what runs on every rank."""
    from dist_train.data.shards import MANIFEST_NAME, read_manifest

    if not shard_url or (Path(shards) / MANIFEST_NAME).is_file():
        return read_manifest(shards, check_files=not shard_url)
    if shard_url.startswith("pipe:") and not allow_pipe_from_remote_manifest:
        raise ShardsNotFound(
            f"{shards} has no {MANIFEST_NAME}, and data.shard_url is a pipe: command: reading the manifest through it "
            f"would let the store's manifest decide what the shell runs on every rank. Copy manifest.json into "
            f"{shards}, or set data.allow_pipe_from_remote_manifest=true if you trust the store")
    return read_remote_manifest(shard_url.format(name=MANIFEST_NAME))


def read_remote_manifest(url: str) -> dict:
    """The ``manifest.json`` at ``url`` (read through the same ``gopen`` as the shards)."""
    stream = None
    try:
        stream = open_url(url)
        text = stream.read()
        stream.close()  # a pipe's close waits for the command and raises on a failed exit status
    except OSError as err:
        if stream is not None:
            close_quietly(stream)
        raise ShardsNotFound(f"cannot read the shard manifest from {url} ({err}); check data.shard_url, or put "
                             f"manifest.json in the local directory data.shards") from err
    if not text:
        raise ShardsNotFound(f"{url} returned nothing (is the server up, and does it hold manifest.json?); check "
                             f"data.shard_url, or put manifest.json in the local directory data.shards")
    from dist_train.data.shards import parse_manifest

    return parse_manifest(text, where=url)


class _Cursor:
    """One open shard, positioned before sample ``offset``."""

    def __init__(self, url: str):
        self.url, self.offset = url, 0
        self.stream: Any = open(url, "rb") if not is_remote(url) else open_url(url)
        try:
            # "r:" on a seekable local file skips a member by seeking past its data; "r|" streams.
            self.tar = tarfile.open(fileobj=self.stream, mode="r:" if not is_remote(url) else "r|")
        except BaseException:
            close_quietly(self.stream)
            raise
        self._pending: tarfile.TarInfo | None = None

    def next_sample(self, *, read: bool) -> dict[str, bytes] | None:
        """The next sample's members by extension (only if ``read``), or None at the end of the shard."""
        from webdataset.tariterators import base_plus_ext

        member = self._pending or self.tar.next()
        self._pending = None
        while member is not None and not member.isfile():
            member = self.tar.next()
        if member is None:
            return None
        key = base_plus_ext(member.name)[0]
        sample: dict[str, Any] = {"__key__": key}
        while member is not None and member.isfile():
            member_key, ext = base_plus_ext(member.name)  # split once per member: this is the data path
            if member_key != key:
                break
            if read:
                extracted = self.tar.extractfile(member)
                assert extracted is not None
                sample[ext] = extracted.read()
            member = self.tar.next()
        self._pending = member  # the next sample's first member, its data not read yet
        self.offset += 1
        return sample

    def close(self) -> None:
        close_quietly(self.stream)


class ShardReader:
    """Reads samples of ``urls`` by (shard, offsets), forward through one open shard at a time."""

    def __init__(self, urls: Sequence[str], *, names: Sequence[str] | None = None,
                 retry_delays_s: Sequence[float] = RETRY_DELAYS_S):
        self.urls = list(urls)
        self.names = list(names) if names is not None else [Path(u).name for u in self.urls]
        self.retry_delays_s = tuple(retry_delays_s)
        self._shard: int | None = None
        self._cursor: _Cursor | None = None

    def take(self, shard: int, offsets: Iterable[int]) -> Iterator[tuple[int, dict[str, bytes]]]:
        """``(offset, sample)`` for each of the increasing ``offsets`` of ``shard``; the samples between are
        skipped without reading their data where the shard is a local file."""
        for offset in offsets:
            yield offset, self._sample(shard, int(offset))

    def _sample(self, shard: int, offset: int) -> dict[str, bytes]:
        for attempt in range(len(self.retry_delays_s) + 1):
            try:
                cursor = self._positioned(shard, offset)
                sample = cursor.next_sample(read=True)
            except (OSError, tarfile.TarError, EOFError) as err:
                self.close()
                if attempt == len(self.retry_delays_s):
                    raise ShardReadError(self._message(shard, f"cannot be read ({err})")) from err
                log.warning("shard %s: %s; retrying in %.0f s", self.urls[shard], err, self.retry_delays_s[attempt])
                time.sleep(self.retry_delays_s[attempt])
                continue
            if sample is None:
                self.close()
                raise ShardReadError(self._message(shard, f"ended before sample {offset} (truncated?)"))
            return sample
        raise AssertionError("unreachable")

    def _positioned(self, shard: int, offset: int) -> _Cursor:
        if self._cursor is None or self._shard != shard or self._cursor.offset > offset:
            self.close()
            self._cursor, self._shard = _Cursor(self.urls[shard]), shard
        cursor = self._cursor
        while cursor.offset < offset:
            if cursor.next_sample(read=False) is None:
                raise EOFError(f"the shard holds only {cursor.offset} samples")
        return cursor

    def _message(self, shard: int, what: str) -> str:
        url = self.urls[shard]
        where = ("check data.shard_url and that the store holds it" if is_remote(url) else
                 "check it with `dist-train make-shards verify DIR`; re-running the make-shards command that wrote "
                 "it rewrites missing shards")
        return f"shard {self.names[shard]} ({url}) {what}; {where}"

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
        self._cursor, self._shard = None, None
