"""Block-level encryption: LUKS2 / dm-crypt volumes driven by ``cryptsetup``.

The host that runs the CVM controls the disk, so a LUKS2 header read from it is untrusted input.
Every open therefore goes through the same steps: copy the header region into sealed memory,
validate that copy against the exact shape sealfs itself formats (:mod:`sealfs.luks.header`),
and hand *that copy* to cryptsetup with ``--header`` so the host cannot swap the header between
check and use (:mod:`sealfs.luks.cryptsetup`). First boot is a resumable state machine
(:mod:`sealfs.luks.firstboot`); keys come from a pluggable source (:mod:`sealfs.luks.keys`).
"""
