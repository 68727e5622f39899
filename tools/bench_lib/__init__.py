"""Benchmark harness for sealfs: filesystem adapters, workloads, runner and report.

Entry points are ``tools/bench`` and ``tools/profile-sealfs``; see docs/benchmarks.md.
Standard library only, so it runs under any Python >= 3.11 (normally the project venv).
"""
