"""This CVM's attester and RTMR3, and reaching the KMS: URLs in order, backoff, deadline.

Every volume gets its own ``deadline`` of retries (docs/init.md, "Failure rules"): each round
tries the configured URLs in order with a short probe, so a dead first replica costs one probe,
not the deadline; between rounds the wait doubles from 0.2 s to 5 s. The client returned speaks
to the first URL that answered (then the others, in order, if it stops answering), with what
is left of the deadline (at least :data:`MIN_CALL_S`) for the attested calls that follow.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sealfs.attest.configfs_tsm import ConfigfsTsmAttester
from sealfs.attest.rtmr import KernelRtmr3, Rtmr3
from sealfs.attest.simulated import DEFAULT_DEVICE_ID, DEV_COMPOSE_HASH, PersistentSimulatedAttester
from sealfs.errors import AttestationError, KmsError
from sealfs.kms.client import Attester, KmsClient, probe

from .config import InitConfig, KmsConfig

PROBE_S = 2.0
MIN_CALL_S = 5.0
SIMULATED_REGISTER = "simulated-rtmr3"


def attester_for(cfg: InitConfig) -> tuple[Attester, Rtmr3]:
    """The quote source and the RTMR3 that measurements extend, as ``[kms] attester`` says.

    A TDX guest without the kernel's RTMR3 interface fails here, before anything is mounted:
    mounting what cannot be measured would let the app start unmeasured."""
    kms = cfg.kms
    if kms.attester == "simulated":
        sim = PersistentSimulatedAttester(
            kms.app_id,
            kms.compose_hash or DEV_COMPOSE_HASH,
            device_id=kms.device_id or DEFAULT_DEVICE_ID,
            register=cfg.runtime_dir / SIMULATED_REGISTER,
            event_log=kms.event_log,
        )
        return sim, sim
    kernel = KernelRtmr3()
    if not kernel.available():
        raise AttestationError(
            f"cannot measure volumes: {kernel.path} does not exist (a TDX guest with Linux "
            '>= 6.16 is needed; attester = "simulated" is for development only)'
        )
    return ConfigfsTsmAttester(event_log_path=kms.event_log), kernel


def _client(kms: KmsConfig, url: str, attester: Attester, deadline: float) -> KmsClient:
    """A client that starts with ``url`` and fails over to the other configured replicas
    (the mount daemons it is handed to keep that order)."""
    urls = [url, *(u for u in kms.urls if u != url)]
    return KmsClient(urls, kms.app_id, attester, trusted_keys=kms.public_keys, deadline_s=deadline)


def reach_kms(
    kms: KmsConfig, attester: Attester, sleep: Callable[[float], None] = time.sleep
) -> KmsClient:
    """A client for the first configured KMS that answers; KmsError once the deadline passed."""
    end = time.monotonic() + kms.deadline
    delay, last = 0.2, "no attempt"
    while True:
        for url in kms.urls:
            left = end - time.monotonic()
            if left <= 0:
                break
            status = probe(url, min(left, PROBE_S))
            if not status.reachable:
                last = f"{url}: {status.error}"
                continue
            return _client(kms, url, attester, max(end - time.monotonic(), MIN_CALL_S))
        left = end - time.monotonic()
        if left <= 0:
            raise KmsError(
                f"KMS not reachable within {kms.deadline:g} s (tried {', '.join(kms.urls)}); "
                f"last: {last}"
            )
        sleep(min(left, delay))
        delay = min(delay * 2, 5.0)
