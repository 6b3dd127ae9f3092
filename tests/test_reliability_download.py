"""Issue 21: ``data.download: true`` without a network is one line naming ``data.download``
and the fix, within seconds, for every DataModule that downloads (MNIST, Fashion-MNIST,
CIFAR-10/100 through torchvision, the Hugging Face hub for text).

Before, torchvision's ``RuntimeError`` (or ``URLError``) came out as a traceback, and its
``urllib`` calls had no timeout, so a dead route could hang a fit. The sources are pointed
at addresses that never answer, so the tests download nothing on a machine with network.
"""

from __future__ import annotations

import socket
import time

import pytest

from kd_lightning.cli import main
from kd_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from kd_lightning.data import download as download_module
from kd_lightning.errors import ConfigError
from tests.conftest import CONFIGS, DEBUG_TRAINER

#: TEST-NET-1 (RFC 5737): routed nowhere, so a connection is refused at once or never answered
BLACKHOLE = "http://192.0.2.1:9/"
MODULES = [MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule, CIFAR100DataModule]


def _point_at(monkeypatch, module: type, url: str) -> None:
    source = module(data_dir=".")._torchvision_class()
    if hasattr(source, "mirrors"):
        monkeypatch.setattr(source, "mirrors", [url, url])
    else:
        monkeypatch.setattr(source, "url", url + source.filename)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_download_without_network_is_one_line_within_the_probe(module, tmp_path, monkeypatch):
    monkeypatch.setattr(download_module, "PROBE_TIMEOUT", 0.5)
    _point_at(monkeypatch, module, BLACKHOLE)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        module(data_dir=str(tmp_path), download=True).prepare_data()
    assert time.perf_counter() - start < 5
    err = info.value
    assert err.field == "data.download" and "\n" not in str(err)
    assert "could be reached" in str(err) and "data.download: false" in str(err)


@pytest.mark.parametrize("module", [MNISTDataModule, CIFAR10DataModule], ids=lambda m: m.__name__)
def test_a_stalled_download_times_out_in_one_line(module, tmp_path, monkeypatch):
    # a host that accepts connections (the kernel's backlog) and never answers a request
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.setattr(download_module, "SOCKET_TIMEOUT", 0.5)
    _point_at(monkeypatch, module, f"http://127.0.0.1:{server.getsockname()[1]}/")
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"data\.download=True.*failed.*timed out"):
            module(data_dir=str(tmp_path), download=True).prepare_data()
    finally:
        server.close()
    assert time.perf_counter() - start < 5
    assert socket.getdefaulttimeout() is None  # the process-wide timeout is restored


def test_hub_download_without_network_is_one_line_within_the_probe(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from kd_lightning.data import text as text_module
    from tests.test_text_data import toy_dm

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", BLACKHOLE.rstrip("/"))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(text_module, "HUB_PROBE_TIMEOUT", 0.5)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="unreachable") as info:
        toy_dm(tmp_path, dataset="org/absent", download=True).setup()
    assert time.perf_counter() - start < 5
    assert info.value.field == "data.download" and "\n" not in str(info.value)


def test_fit_with_download_offline_stops_in_one_line(tmp_path, monkeypatch):
    # through the documented CLI: prepare_data runs inside Trainer.fit
    monkeypatch.setattr(download_module, "PROBE_TIMEOUT", 0.5)
    _point_at(monkeypatch, MNISTDataModule, BLACKHOLE)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        main(["fit", "-c", str(CONFIGS / "quickstart" / "scratch.yaml"), *DEBUG_TRAINER,
              "--data=kd_lightning.data.MNISTDataModule", f"--data.data_dir={tmp_path}",
              "--data.download=true"])
    assert info.value.field == "data.download" and "\n" not in str(info.value)
