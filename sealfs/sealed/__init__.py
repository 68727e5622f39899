"""The sealed-object layer: every format a volume stores, sealed and opened in one place.

``codec``    byte layouts and associated data of blocks, commit records, journal frames and
             checkpoints (pure functions of their inputs);
``inode``    the inode and its record layout;
``objects``  :class:`~sealfs.sealed.objects.SealedObjects`, which binds each object to its
             identity (volume, inode, block index, object id, journal generation, commit) under
             the right key: what the filesystem core, the metadata log, the checker and the
             volume tools call to seal or open anything.

It stands between the filesystem core (``sealfs.fs``, ``sealfs.check``) and ``sealfs.crypto``
and never imports either of the former.
"""
