"""Attestation: quote sources (configfs-tsm, simulated), event logs and DCAP verification."""
