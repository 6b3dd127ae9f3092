"""Keep W&B from hanging a run: go offline, with a warning, when its server is unreachable.

``wandb.init`` in online mode retries its connection for minutes when the network is down
(or firewalled, as on many compute nodes), and with no credentials it may prompt for an
API key on a terminal. Both look like a hung job. Before the loggers are built, the CLI
calls ``guard_wandb_config``: if a W&B logger is configured online, it checks for
credentials and probes the W&B host with a short TCP connect (in a daemon thread, so even
a stalled DNS lookup cannot block for longer than the timeout). When either fails it sets
``WANDB_MODE=offline`` and warns; the run logs locally and ``wandb sync`` uploads it later.
"""

from __future__ import annotations

import netrc
import os
import socket
import threading
import warnings
from typing import Any
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.wandb.ai"
#: seconds to wait for the W&B host before falling back to offline
PROBE_TIMEOUT = 3.0


def wandb_endpoint() -> tuple[str, int]:
    """(host, port) of the W&B server this process would talk to (``WANDB_BASE_URL``)."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL))
    port = url.port or (80 if url.scheme == "http" else 443)
    return url.hostname or "api.wandb.ai", port


def reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (DNS
    included: the attempt runs in a daemon thread that is abandoned at the deadline)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, name="kd-wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def has_credentials(host: str) -> bool:
    """An API key in ``WANDB_API_KEY`` or in ``~/.netrc`` (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _is_wandb_logger(class_path: str) -> bool:
    if class_path.rsplit(".", 1)[-1] == "WandbLogger":
        return True
    try:  # subclasses (e.g. a project's own W&B logger) count too
        module, _, name = class_path.rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name)
        from lightning.pytorch.loggers import WandbLogger

        return isinstance(cls, type) and issubclass(cls, WandbLogger)
    except Exception:
        return False


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _set(obj: Any, key: str, value: Any) -> None:
    if isinstance(obj, dict):
        obj[key] = value
    else:
        setattr(obj, key, value)


def wandb_logger_configs(trainer_config: Any) -> list[Any]:
    """The ``init_args`` of every W&B logger in a (parsed) ``trainer`` config."""
    loggers = _get(trainer_config, "logger")
    if loggers is None or isinstance(loggers, bool):
        return []
    if not isinstance(loggers, list):
        loggers = [loggers]
    found = []
    for logger in loggers:
        class_path = _get(logger, "class_path")
        if isinstance(class_path, str) and _is_wandb_logger(class_path):
            init_args = _get(logger, "init_args")
            if init_args is None:
                init_args = {}
                _set(logger, "init_args", init_args)
            found.append(init_args)
    return found


def guard_wandb_config(trainer_config: Any, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Switch configured-online W&B loggers to offline when they could not work online.

    Returns the reason when it switched (also issued as a warning), else None.
    """
    configs = wandb_logger_configs(trainer_config)
    if not configs or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return None
    online = [c for c in configs if not _get(c, "offline", False) and _get(c, "mode") not in (
        "offline", "disabled"
    )]
    if not online:
        return None
    host, port = wandb_endpoint()
    if not has_credentials(host):
        reason = f"no W&B API key (WANDB_API_KEY or `wandb login`) for {host}"
    elif not reachable(host, port, timeout):
        reason = f"the W&B server {host}:{port} did not answer within {timeout:g} s"
    else:
        return None
    os.environ["WANDB_MODE"] = "offline"
    for c in online:
        if _get(c, "mode") is not None:  # an explicit mode="online" would win over the env
            _set(c, "mode", "offline")
    warnings.warn(
        f"{reason}: logging to W&B offline instead (the run is saved locally; upload it "
        "later with `wandb sync <dir>`). Set WANDB_MODE=offline to skip this check.",
        stacklevel=2,
    )
    return reason
