"""sealfs: encrypted, authenticated, rollback-aware storage for confidential VMs."""

__version__ = "0.1.0"
