"""The autocast switch: bf16 on CUDA by default, off with CRYOMAE_AUTOCAST=off, never on the CPU."""

from __future__ import annotations

import pytest
import torch

from cryomae.device import AUTOCAST_ENV, autocast, autocast_dtype

CUDA = torch.device("cuda")  # a device object only: nothing runs on it
CPU = torch.device("cpu")


def test_bf16_on_cuda_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTOCAST_ENV, raising=False)
    assert autocast_dtype(CUDA) is torch.bfloat16
    monkeypatch.setenv(AUTOCAST_ENV, "BF16")
    assert autocast_dtype(CUDA) is torch.bfloat16


def test_off_switches_cuda_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTOCAST_ENV, "off")
    assert autocast_dtype(CUDA) is None


@pytest.mark.parametrize("value", [None, "bf16", "off"])
def test_cpu_stays_float32(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(AUTOCAST_ENV, raising=False)
    else:
        monkeypatch.setenv(AUTOCAST_ENV, value)
    assert autocast_dtype(CPU) is None
    a = torch.randn(4, 4)
    with autocast(CPU):
        assert (a @ a).dtype == torch.float32


def test_unknown_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTOCAST_ENV, "fp8")
    with pytest.raises(ValueError, match="CRYOMAE_AUTOCAST"):
        autocast_dtype(CUDA)
    with pytest.raises(ValueError, match="CRYOMAE_AUTOCAST"), autocast(CPU):
        pass
