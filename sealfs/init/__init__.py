"""CVM init: bring an app's declared volumes up at boot, measured and fail-safe (docs/init.md)."""
