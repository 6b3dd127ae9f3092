"""``data.download: true`` without a network: one line naming the field, never a hang.

torchvision's downloaders call ``urllib`` with no timeout and raise a bare ``RuntimeError``
(or hang on a dead route), so ``fetch_bounded`` first probes the source hosts with a short
TCP connect (DNS included), then runs the download under a socket timeout, and turns any
failure into ``ConfigError("data.download", ...)`` with the fix.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlparse

from kd_lightning.errors import ConfigError

#: seconds one host may take to accept a TCP connection before it counts as unreachable
PROBE_TIMEOUT = 3.0
#: seconds any one socket operation of the download may block (a stalled transfer)
SOCKET_TIMEOUT = 30.0


def _host(url: str) -> tuple[str, int]:
    parts = urlparse(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def fetch_bounded(what: str, urls: Sequence[str], fetch: Callable[[], None], fix: str) -> None:
    """Run ``fetch`` (a torchvision download of ``what`` from ``urls``), bounded in time.

    Raises ``ConfigError`` on ``data.download`` when no host of ``urls`` answers within
    ``PROBE_TIMEOUT`` or when the download fails or stalls past ``SOCKET_TIMEOUT``.
    """
    from kd_lightning.tracking_guard import reachable

    hosts = list(dict.fromkeys(_host(u) for u in urls))
    if not any(reachable(host, port, PROBE_TIMEOUT) for host, port in hosts):
        names = ", ".join(f"{h}:{p}" for h, p in hosts)
        raise ConfigError(
            "data.download", True,
            f"cannot download {what}: none of {names} could be reached within "
            f"{PROBE_TIMEOUT:g} s (offline?); {fix}",
        )
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(SOCKET_TIMEOUT)  # urllib's default: block forever
    try:
        fetch()
    except (OSError, RuntimeError) as err:  # URLError/timeout are OSErrors; torchvision wraps
        # torchvision's message ends with the last mirror's error (its first line names a file)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(err).__name__
        raise ConfigError("data.download", True, f"downloading {what} failed ({cause}); {fix}") from None
    finally:
        socket.setdefaulttimeout(previous)
