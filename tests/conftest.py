"""Shared fixtures for the pykernels tests."""

import pytest

import _pykernels_cpu


def _use_isa(request, name):
    """Force the CPU kernels' instruction set for one test; the finalizer restores the previous one."""
    previous = _pykernels_cpu.active_isa()
    request.addfinalizer(lambda: _pykernels_cpu.set_isa(previous))
    try:
        _pykernels_cpu.set_isa(name)
    except ValueError:
        pytest.skip(f"this CPU cannot run the {name!r} kernels")
    assert _pykernels_cpu.active_isa() == name
    return name


@pytest.fixture(params=["avx2", "portable"])
def isa(request):
    """Runs the test once on the AVX2+FMA path (skipped on CPUs without it) and once on the portable path."""
    return _use_isa(request, request.param)


@pytest.fixture
def portable_isa(request):
    """The portable (baseline x86-64) kernels for the duration of one test."""
    return _use_isa(request, "portable")
