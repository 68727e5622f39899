"""Reading file blocks: the clean cache, loads from the store, and read-ahead.

Block ``i`` of a node is, from newest to oldest, in ``node.dirty_blocks[i]`` (being
modified), ``node.flushing[i]`` (being sealed and written back), the clean cache, or the store
under object ``node.blocks[i]``; a block absent from the block map is a hole and reads as
zeros. The writer (:class:`sealfs.fs.data.DataPath`) owns the first two and tells the cache
what to keep or forget when it writes a block back or cuts one off.

Sequential reads are prefetched: a read that continues where the previous one on the node
ended starts loading the next ``readahead`` bytes in the background, so the backing disk and
the decryption work on the next blocks while the kernel is still copying out this one
(docs/concurrency.md, "Read-ahead").
"""

from __future__ import annotations

import errno
import functools
from collections import OrderedDict

import trio

from sealfs.crypto import AuthError
from sealfs.fs.errors import Damaged, FsError
from sealfs.fs.limits import Limits
from sealfs.fs.nodes import InodeTable
from sealfs.fs.workers import Workers
from sealfs.sealed.codec import CodecError, block_object_max
from sealfs.sealed.inode import Inode
from sealfs.sealed.objects import SealedObjects
from sealfs.store import DamagedFile, MissingObject, ObjectStore


class BlockCache:
    """The current plaintext of file blocks, and the cache of clean ones."""

    def __init__(
        self,
        store: ObjectStore,
        objects: SealedObjects,
        workers: Workers,
        nodes: InodeTable,
        limits: Limits,
    ) -> None:
        self.store = store
        self.objects = objects
        self.workers = workers
        self.nodes = nodes  # names paths and reports damage
        self.block_size = objects.block_size
        self.clean_limit = limits.clean_cache_bytes
        self.readahead_blocks = limits.readahead // self.block_size
        self._clean: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._clean_bytes = 0
        self._loading: dict[tuple[int, int], trio.Event] = {}  # prefetches in flight

    # --- the clean cache -----------------------------------------------------------------

    @property
    def clean_blocks(self) -> int:
        return len(self._clean)

    def forget(self, ino: int, idx: int) -> None:
        """Drop a block from the clean cache (it changed, or is gone)."""
        data = self._clean.pop((ino, idx), None)
        if data is not None:
            self._clean_bytes -= len(data)

    def keep(self, ino: int, idx: int, data: bytes) -> None:
        """Cache ``data`` as the stored content of a block, within the cache's budget."""
        self.forget(ino, idx)
        self._clean[(ino, idx)] = data
        self._clean_bytes += len(data)
        while self._clean_bytes > self.clean_limit and self._clean:
            _, old = self._clean.popitem(last=False)
            self._clean_bytes -= len(old)

    def loading(self, node: Inode, idx: int) -> bool:
        """Whether a prefetch is reading the block from the store right now."""
        return (node.ino, idx) in self._loading

    # --- reading -------------------------------------------------------------------------

    def in_memory(self, node: Inode, idx: int) -> bytes | None:
        """The block's current content if no store read is needed (b"" for a hole)."""
        buf = node.dirty_blocks.get(idx)
        if buf is not None:
            return bytes(buf)
        flushing = node.flushing.get(idx)
        if flushing is not None:
            return flushing[0]
        if idx == 0 and node.inline is not None:
            return node.inline
        cached = self._clean.get((node.ino, idx))
        if cached is not None:
            self._clean.move_to_end((node.ino, idx))
            return cached
        return None if idx in node.blocks else b""

    async def blocks(self, node: Inode, indexes: list[int]) -> dict[int, bytes]:
        """Current plaintext of the given blocks (b"" for holes)."""
        out: dict[int, bytes] = {}
        for _attempt in range(8):
            missing, pending = [], None
            for idx in indexes:
                if idx in out:
                    continue
                data = self.in_memory(node, idx)
                if data is not None:
                    out[idx] = data
                elif (node.ino, idx) in self._loading:
                    pending = self._loading[(node.ino, idx)]
                else:
                    missing.append((idx, node.blocks[idx]))
            if not missing:
                if pending is None:
                    return out
                await pending.wait()  # a prefetch is loading it: do not read it twice
                continue
            loaded = await self.workers.halves(functools.partial(self._load, node.ino), missing)
            for idx, oid, result in loaded:
                if isinstance(result, Exception):
                    if node.blocks.get(idx) != oid:
                        continue  # rewritten while we read the old object: read again
                    node.damaged.add(idx)
                    reason = "missing" if isinstance(result, MissingObject) else str(result)
                    damage = Damaged(self.nodes.path_of(node.ino), f"block {idx}", oid, reason)
                    self.nodes.on_damage(damage)
                    raise damage
                node.damaged.discard(idx)
                if node.blocks.get(idx) == oid:
                    self.keep(node.ino, idx, result)
                    out[idx] = result
        raise FsError(errno.EAGAIN)  # pragma: no cover - a block rewritten 8 times mid-read

    def _prefetch(self, node: Inode, last: int) -> None:
        """The reader is at block ``last``: keep the next ``readahead`` bytes loading.

        Loads go out in jobs of half the window each (one thread hop per job, not per block:
        on two cores the hand-offs between threads, not the disk or AES, were the cost).
        Failures are ignored here: the read that needs the block loads it again and reports.
        """
        window = self.readahead_blocks
        nursery = self.workers.nursery
        if nursery is None or node.dead or node.prefetched - last > window // 2:
            return
        start = max(last + 1, node.prefetched)
        stop = min(last + 1 + window, -(-node.size // self.block_size))
        node.prefetched = stop
        wanted = []
        for idx in range(start, stop):
            oid = node.blocks.get(idx)
            if (
                oid is not None
                and (node.ino, idx) not in self._loading
                and self.in_memory(node, idx) is None
            ):
                wanted.append((idx, oid))
        if not wanted:
            return
        done = trio.Event()
        for idx, _ in wanted:
            self._loading[(node.ino, idx)] = done
        nursery.start_soon(self._run_prefetch, node, wanted, done)

    async def _run_prefetch(
        self, node: Inode, wanted: list[tuple[int, int]], done: trio.Event
    ) -> None:
        try:
            loaded = await self.workers.run(self._load, node.ino, wanted)
        finally:
            for idx, _ in wanted:
                if self._loading.get((node.ino, idx)) is done:
                    del self._loading[(node.ino, idx)]
            done.set()
        for idx, oid, result in loaded:
            if (
                not isinstance(result, Exception)
                and not node.dead
                and node.blocks.get(idx) == oid
                and idx not in node.dirty_blocks
                and idx not in node.flushing
            ):
                self.keep(node.ino, idx, result)

    def _load(
        self, ino: int, wanted: list[tuple[int, int]]
    ) -> list[tuple[int, int, bytes | Exception]]:
        """(Worker thread.) Read and open the given block objects."""
        res: list[tuple[int, int, bytes | Exception]] = []
        limit = block_object_max(self.block_size)
        for idx, oid in wanted:
            try:
                res.append(
                    (idx, oid, self.objects.open_block(ino, idx, oid, self.store.get(oid, limit)))
                )
            except (AuthError, CodecError, MissingObject, DamagedFile) as e:
                res.append((idx, oid, e))
        return res

    async def read(self, node: Inode, off: int, size: int) -> bytes:
        end = min(off + size, node.size)
        if off >= end:
            return b""
        bs = self.block_size
        first, last = off // bs, (end - 1) // bs
        if self.readahead_blocks and off == node.read_next and off:
            self._prefetch(node, last)
        elif off != node.read_next:
            node.prefetched = 0  # not sequential (any more): start over
        node.read_next = end
        blocks = await self.blocks(node, list(range(first, last + 1)))
        parts = []
        for idx in range(first, last + 1):
            base = idx * bs
            lo, hi = max(off, base) - base, min(end, base + bs) - base
            block = blocks[idx]
            chunk = block if lo == 0 and hi == len(block) else block[lo:hi]
            parts.append(chunk)
            if len(chunk) < hi - lo:
                parts.append(bytes(hi - lo - len(chunk)))
        return parts[0] if len(parts) == 1 else b"".join(parts)
