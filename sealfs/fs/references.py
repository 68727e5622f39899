"""The kernel's references to inodes: lookups it holds and files it has open.

They decide an inode's lifetime: an unlinked inode lives on while the kernel references it or
has it open (POSIX: an open file outlives its last name), and is destroyed when the last
reference goes; a clean, unreferenced one may leave the node cache.
"""

from __future__ import annotations

from sealfs.fs.data import DataPath
from sealfs.fs.nodes import InodeTable
from sealfs.sealed.inode import ROOT_INO, Inode


class References:
    """Counts lookups (``remember``/``forget``) and opens, and releases unused inodes."""

    def __init__(self, nodes: InodeTable, data: DataPath) -> None:
        self.nodes = nodes
        self.data = data

    def remember(self, node: Inode) -> None:
        """The kernel now holds one more reference (a lookup reply)."""
        node.lookups += 1

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.nodes.get(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - count)
        self.release_if_unused(node)

    def opened(self, node: Inode) -> None:
        node.opens += 1

    def closed(self, node: Inode) -> bool:
        """One open of ``node`` ended; whether it was the last."""
        node.opens = max(0, node.opens - 1)
        return not node.opens

    def release_if_unused(self, node: Inode) -> None:
        """Destroy an unlinked inode nobody uses, or drop a clean unused one from memory."""
        if node.lookups or node.opens or node.ino == ROOT_INO:
            return
        if node.nlink == 0:
            self.data.drop(node)
            self.nodes.destroy(node)
        else:
            self.nodes.evict_if_clean(node)
