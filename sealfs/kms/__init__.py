"""The sealfs key management service: attested key release and volume freshness anchors.

Modules: ``protocol`` (wire messages and bindings), ``derivation`` (HKDF labels),
``policy`` (per-app release policy), ``store`` (SQLite state), ``verify`` (quote
verification), ``service`` (the decision logic), ``server`` (strict HTTP/1.1 on trio) and
``client`` (what a CVM calls). The protocol is described in docs/kms-protocol.md.
"""
