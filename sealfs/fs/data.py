"""File contents: writes, truncation and the write-back of blocks.

A file is a sequence of ``block_size`` blocks. A write copies into ``node.dirty_blocks``; a
write-back moves a block to ``node.flushing`` while a background job seals and stores it, then
points the block map at the new object and hands the data to the clean cache
(:class:`sealfs.fs.blocks.BlockCache`, which also serves every read). A missing block is a hole
and reads as zeros.

A file of at most ``INLINE_MAX`` bytes keeps its data in its own inode record (``node.inline``)
rather than in a block object: creating a small file then costs one backing file, not two. It
moves to a block object as soon as it grows past that size.

Blocks written back for an fsync (up to ``carry_max`` bytes per commit) are not stored as files:
the commit that follows carries them in its journal frame, so an fsync of a small change is one
journal append and one fdatasync (docs/format.md, "Objects carried in the journal").

Writes only copy into memory; a block that a write fills up to its end is handed to a
background task that seals and stores it, so the next FUSE write is accepted while the previous
block is still being encrypted (at most ``Limits.inflight_batches`` jobs at a time: that is the
back-pressure). Blocks rewritten in the middle stay dirty until an fsync or the dirty budget. A write
error in the background is remembered on the node and reported by the next fsync, like the
kernel's own writeback errors. Only when a block's new object is written does the block map
point at it; the object it replaces is deleted after the next commit (docs/format.md).
"""

from __future__ import annotations

import errno
import logging

import trio

from sealfs.errors import StorageError
from sealfs.fs.blocks import BlockCache
from sealfs.fs.errors import FsError
from sealfs.fs.limits import Limits
from sealfs.fs.nodes import InodeTable
from sealfs.fs.workers import Workers
from sealfs.sealed.codec import MAX_FILE_BLOCKS, new_object_id
from sealfs.sealed.inode import Inode
from sealfs.sealed.objects import SealedObjects
from sealfs.store import ObjectStore

log = logging.getLogger("sealfs.fs")

FALLOC_FL_KEEP_SIZE = 0x01
INLINE_MAX = 4096  # files up to this size keep their data in their inode record


class DataPath:
    """Writes, truncates and writes back file blocks for the filesystem core."""

    def __init__(
        self,
        store: ObjectStore,
        objects: SealedObjects,
        workers: Workers,
        nodes: InodeTable,
        cache: BlockCache,
        limits: Limits,
    ) -> None:
        self.store = store
        self.objects = objects
        self.workers = workers
        self.nodes = nodes  # marks changed inodes, names paths
        self.cache = cache  # current content of blocks; keeps what is written back
        self.block_size = objects.block_size
        self.dirty_limit = limits.dirty_blocks
        self._inflight = trio.Semaphore(limits.inflight_batches)
        self.superseded: list[int] = []  # objects no longer referenced by any block map
        self.dirty_count = 0
        self.carry_max = limits.carried_blocks
        self.inline_max = limits.inline_seal_bytes
        self._carry: dict[int, tuple[int, bytes]] = {}  # sealed blocks for the next commit
        self._carry_bytes = 0

    # --- writing -------------------------------------------------------------------------

    def lock(self, node: Inode) -> trio.Lock:
        if node.lock is None:
            node.lock = trio.Lock()
        return node.lock

    async def write(self, node: Inode, off: int, buf: bytes) -> int:
        if not buf:
            return 0
        self._raise_pending(node)
        end = off + len(buf)
        if end > MAX_FILE_BLOCKS * self.block_size:  # its record would exceed what is read
            raise FsError(errno.EFBIG)
        lock = self.lock(node)
        if not lock.locked():
            # Fast path (appends, small writes): no data operation on this node is under way
            # and every partly overwritten block is in memory, so the copy contains no await
            # and is atomic without taking the lock (which would cost two scheduler trips).
            current = self._partial_in_memory(node, off, end)
            if current is not None:
                full, over_budget = self._copy_in(node, off, buf, current)
                if full:
                    async with lock:
                        await self._start_flush(node, full, cache=over_budget)
                return len(buf)
        async with lock:
            partial = self._partial(node, off, end)
            current = await self.cache.blocks(node, partial) if partial else {}
            full, over_budget = self._copy_in(node, off, buf, current)
            if full:
                await self._start_flush(node, full, cache=over_budget)
        return len(buf)

    def _partial(self, node: Inode, off: int, end: int) -> list[int]:
        """Blocks only partly overwritten by ``[off, end)``: they need their content first."""
        bs = self.block_size
        return [
            idx
            for idx in {off // bs, (end - 1) // bs}
            if idx not in node.dirty_blocks
            and not (off <= idx * bs and end >= min((idx + 1) * bs, node.size))
        ]

    def _partial_in_memory(self, node: Inode, off: int, end: int) -> dict[int, bytes] | None:
        """The current content of the partly overwritten blocks, or None if one must be read
        from the store (or is being read by a prefetch)."""
        current = {}
        for idx in self._partial(node, off, end):
            data = self.cache.in_memory(node, idx)
            if data is None or self.cache.loading(node, idx):
                return None
            current[idx] = data
        return current

    def _copy_in(
        self, node: Inode, off: int, buf: bytes, current: dict[int, bytes]
    ) -> tuple[list[int], bool]:
        """Copy ``buf`` into the node's dirty blocks (no await: atomic). Return the blocks to
        write back now, and whether that is because of the dirty budget: all of the node's
        dirty blocks then, else the blocks this write filled up to their end (a streaming
        writer is done with them; a random writer that rewrites the middle of a block keeps
        it dirty, so several small writes to it are written back once)."""
        bs = self.block_size
        end = off + len(buf)
        first, last = off // bs, (end - 1) // bs
        view = memoryview(buf)
        for idx in range(first, last + 1):
            base = idx * bs
            lo, hi = max(off, base) - base, min(end, base + bs) - base
            block = node.dirty_blocks.get(idx)
            if block is None:
                if lo == 0 and hi == bs:
                    block = bytearray(view[base - off : base - off + bs])
                else:
                    block = bytearray(current.get(idx, b""))
                node.dirty_blocks[idx] = block
                self.dirty_count += 1
                if lo == 0 and hi == bs:
                    continue
            if len(block) < lo:
                block.extend(bytes(lo - len(block)))
            block[lo:hi] = view[base + lo - off : base + hi - off]
        if end > node.size:
            node.size = end
        self.nodes.mark(node)
        if self.dirty_count > self.dirty_limit:
            return list(node.dirty_blocks), True
        return [
            idx
            for idx in range(first, last + 1)
            if end >= (idx + 1) * bs and len(node.dirty_blocks.get(idx, b"")) == bs
        ], False

    async def truncate(self, node: Inode, size: int) -> None:
        async with self.lock(node):
            await self._wait_flushing(node)  # no old content may land after the cut
            bs = self.block_size
            if node.inline is not None and len(node.inline) > size:
                node.inline = node.inline[:size] or None
            if size < node.size:
                keep = -(-size // bs)  # blocks [0, keep) survive
                for idx in [i for i in node.blocks if i >= keep]:
                    self.superseded.append(node.blocks.pop(idx))
                    self.cache.forget(node.ino, idx)
                for idx in [i for i in node.dirty_blocks if i >= keep]:
                    del node.dirty_blocks[idx]
                    self.dirty_count -= 1
                cut = size % bs
                if cut:
                    idx = size // bs
                    block = (await self.cache.blocks(node, [idx]))[idx]
                    if len(block) > cut:
                        if idx not in node.dirty_blocks:
                            self.dirty_count += 1
                        node.dirty_blocks[idx] = bytearray(block[:cut])
                        self.cache.forget(node.ino, idx)
            node.size = size
            self.nodes.mark(node)

    async def fallocate(self, node: Inode, mode: int, off: int, length: int) -> None:
        """Mode 0 extends the size (holes read as zeros); KEEP_SIZE changes nothing visible.
        Space is not reserved on the backing store (docs/format.md)."""
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise FsError(errno.EOPNOTSUPP)
        if off < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        if not node.is_file:
            raise FsError(errno.ENODEV)
        if not mode & FALLOC_FL_KEEP_SIZE and off + length > node.size:
            async with self.lock(node):
                node.size = max(node.size, off + length)
                self.nodes.mark(node)

    # --- flushing ------------------------------------------------------------------------

    def _inline(self, node: Inode, indexes: list[int]) -> list[int]:
        """Keep a small file's data in its record; return the blocks that still need objects.

        A file stays inline while it is at most ``INLINE_MAX`` bytes and has no block objects;
        when it grows past that, its inline data becomes dirty block 0 and is written back
        with the rest.
        """
        if (
            node.size <= INLINE_MAX
            and not node.blocks
            and not node.flushing
            and node.dirty_blocks.keys() <= {0}
        ):
            if 0 in node.dirty_blocks:
                node.inline = bytes(node.dirty_blocks.pop(0)) or None
                self.dirty_count -= 1
                self.nodes.mark(node)
            return []
        if node.inline is not None:
            if 0 not in node.dirty_blocks:
                node.dirty_blocks[0] = bytearray(node.inline)
                self.dirty_count += 1
            node.inline = None
            self.nodes.mark(node)
            if 0 not in indexes:
                indexes = [0, *indexes]
        return indexes

    def take_carried(self) -> dict[int, tuple[int, bytes]]:
        """The sealed blocks (object id -> (ino, blob)) the next commit must carry."""
        out = {oid: v for oid, v in self._carry.items() if oid in self.store.carried}
        self._carry, self._carry_bytes = {}, 0
        return out

    def untake_carried(self, blocks: dict[int, tuple[int, bytes]]) -> None:
        """A commit failed: its carried blocks go into the next one."""
        self._carry.update(blocks)

    async def _start_flush(
        self, node: Inode, indexes: list[int], carry: bool = False, cache: bool = True
    ) -> None:
        """Hand dirty blocks to one background job (one thread hop for the whole batch).
        With ``carry`` (an fsync is waiting), a batch that fits the commit's carry budget is
        sealed for the next commit's journal frame instead of written as files (on the trio
        thread when it is at most ``inline_seal_bytes``: cheaper than a hop). Without
        ``cache`` (a streaming writer filled them) the blocks are not kept in the clean cache
        afterwards: they would only push out blocks that are read again."""
        indexes = self._inline(node, indexes)
        batch = [
            (idx, bytes(node.dirty_blocks.pop(idx)))
            for idx in indexes
            if idx in node.dirty_blocks and idx not in node.flushing
        ]
        if not batch:
            return  # one flush per block at a time; the rest stays dirty for the next round
        self.dirty_count -= len(batch)
        size = sum(len(data) for _, data in batch)
        carry = carry and self._carry_bytes + size <= self.carry_max
        if carry:
            self._carry_bytes += size
        done = trio.Event()
        for idx, data in batch:
            node.flushing[idx] = (data, done)
        await self._inflight.acquire()
        nursery = self.workers.nursery
        if nursery is None or self._seals_inline(batch, carry):
            await self._flush_batch(node, batch, done, carry, cache)
        else:
            nursery.start_soon(self._flush_batch, node, batch, done, carry, cache)

    def _seals_inline(self, batch: list[tuple[int, bytes]], carry: bool) -> bool:
        """Whether a batch is only sealed, and so little that the trio thread does it faster
        than a worker (docs/concurrency.md, "Who runs where")."""
        return carry and sum(len(data) for _, data in batch) <= self.inline_max

    async def _flush_batch(
        self,
        node: Inode,
        batch: list[tuple[int, bytes]],
        done: trio.Event,
        carry: bool,
        cache: bool,
    ) -> None:
        ino = node.ino
        jobs = [(idx, new_object_id(), data) for idx, data in batch]

        def put() -> list[bytes | None]:
            """Seal each block; store it as a file, or (carry) return it for the commit."""
            blobs: list[bytes | None] = []
            for idx, oid, data in jobs:
                blob = self.objects.seal_block(ino, idx, oid, data)
                if not carry:
                    self.store.put(oid, blob)
                blobs.append(blob if carry else None)
            return blobs

        try:
            # A small carried batch (an fsync'ed tail) is only sealed: cheaper here than the
            # two thread hand-offs a worker would cost.
            blobs = put() if self._seals_inline(batch, carry) else await self.workers.run(put)
        except Exception as e:
            for idx, oid, data in jobs:
                self._flush_failed(node, idx, data, e)
                self.superseded.append(oid)  # in case a partial object was left
            return
        finally:
            self._inflight.release()
            done.set()
        for (idx, oid, data), blob in zip(jobs, blobs, strict=True):
            current = node.flushing.get(idx)
            if current is None or current[0] is not data or node.dead:
                self.superseded.append(oid)  # truncated or deleted meanwhile
                if current is not None and current[0] is data:
                    del node.flushing[idx]  # else flush() waits on it forever
                continue
            del node.flushing[idx]
            if blob is not None:  # readable from the store now; durable with the next commit
                self.store.carry(oid, blob)
                self._carry[oid] = (ino, blob)
            old = node.blocks.get(idx)
            if old is not None:
                self.superseded.append(old)
            node.blocks[idx] = oid
            if cache:
                self.cache.keep(node.ino, idx, data)
            else:
                self.cache.forget(node.ino, idx)  # never leave an older version cached
        if not node.dead:
            self.nodes.mark(node)

    def _flush_failed(self, node: Inode, idx: int, data: bytes, e: BaseException) -> None:
        current = node.flushing.get(idx)
        if current is not None and current[0] is data:
            del node.flushing[idx]
            if idx not in node.dirty_blocks and not node.dead:
                node.dirty_blocks[idx] = bytearray(data)  # keep it; retried later
                self.dirty_count += 1
        first = not node.write_error  # log once per failure, not once per waiting write
        if isinstance(e, StorageError):
            node.write_error = getattr(e, "errno", errno.EIO)
            if first:
                log.error("writing %s failed: %s", self.nodes.path_of(node.ino), e)
        else:
            node.write_error = errno.EIO
            if first:
                log.error("writing %s failed", self.nodes.path_of(node.ino), exc_info=e)

    async def _wait_flushing(self, node: Inode) -> None:
        while node.flushing:
            _, done = next(iter(node.flushing.values()))
            await done.wait()

    async def flush(self, node: Inode, wait: bool = True) -> None:
        """Write back all of ``node``'s dirty blocks; with ``wait``, until they are stored
        and then report any background write error (as fsync must)."""
        while not node.dead:
            # Under the node's lock: a writer between loading a block and copying into it
            # must not see that block vanish from dirty_blocks.
            async with self.lock(node):
                await self._start_flush(node, list(node.dirty_blocks), carry=wait)
            if not wait:
                return
            await self._wait_flushing(node)
            self._raise_pending(node, clear=True)  # a failed block stays dirty: stop here
            if not node.dirty_blocks and not node.flushing:
                return

    @staticmethod
    def _raise_pending(node: Inode, clear: bool = False) -> None:
        """Raise a background write error: writes see it (so a full disk stops them), and
        fsync reports and clears it."""
        if node.write_error:
            err = node.write_error
            if clear:
                node.write_error = 0
            e = StorageError(f"an earlier write-back failed: {errno.errorcode.get(err, err)}")
            e.errno = err  # type: ignore[attr-defined]
            raise e

    def drop(self, node: Inode) -> None:
        """Forget a destroyed node's cached and dirty data."""
        node.dead = True
        self.dirty_count -= len(node.dirty_blocks)
        node.dirty_blocks.clear()
        node.flushing.clear()  # jobs in flight see this and discard their objects
        for idx in node.blocks:
            self.cache.forget(node.ino, idx)
