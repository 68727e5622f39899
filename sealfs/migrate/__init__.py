"""Moving a volume to another host: a bundle of its ciphertext plus an authenticated manifest.

``export`` copies a volume's committed state (header, checkpoint, journal, every referenced
object) into a bundle directory, incrementally and, for the objects, while the volume is
mounted; ``importer`` verifies a bundle completely before anything appears at the new backing
directory. The format is in docs/format.md, "Migration bundle".
"""
