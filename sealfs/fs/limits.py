"""The knobs of the filesystem core: memory budgets and timings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    """Memory and timing knobs (defaults keep the daemon well under 200 MiB)."""

    dirty_blocks: int = 256  # partly written blocks buffered before a forced flush
    inflight_batches: int = 4  # write-back jobs (up to one FUSE write each) in flight
    clean_cache_bytes: int = 64 << 20
    readahead: int = 8 << 20  # sequential reads: bytes loaded ahead of the reader
    node_cache: int = 20000  # clean, unreferenced inodes kept in memory
    commit_interval: float = 5.0
    anchor_interval: float = 30.0  # seconds between freshness-anchor advances at the KMS
    io_threads: int = 4
    # A commit writes a checkpoint once the journal is longer than checkpoint_min_journal
    # (and 4x the checkpoint) and either carried_in_memory bytes of live carried objects are
    # held or the journal is longer than journal_max (see _checkpoint_due).
    checkpoint_min_journal: int = 4 << 20
    carried_in_memory: int = 8 << 20
    journal_max: int = 32 << 20
    carried_record_max: int = 16 << 10  # sealed records up to this size ride in the journal
    carried_blocks: int = 512 << 10  # bytes of fsync'ed blocks one commit may carry
    # Sealing at most this many bytes runs on the trio thread instead of a worker: a thread
    # hand-off costs ~0.3 ms here, sealing 128 KiB ~0.1 ms (docs/benchmarks.md).
    inline_seal_bytes: int = 128 << 10
