"""Exceptions of the data pipeline.

Kept in a module of their own, free of heavy imports, so that the reader can catch them
without importing the writers or the decoders.
"""

from __future__ import annotations


class BadSample(ValueError):
    """A sample whose image cannot be decoded.

    The reader skips such a sample and counts it; it is never a reason to stop training.
    """

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message if key is None else f"sample {key!r}: {message}")
        self.key = key


class ShardsNotFound(FileNotFoundError):
    """The shard directory, its manifest or one of its shard files is missing."""


class ShardVerificationError(RuntimeError):
    """A shard does not match its manifest entry (checksum, sample count or content)."""

    def __init__(self, message: str, *, bad_shards: list[str]):
        super().__init__(message)
        self.bad_shards = bad_shards
