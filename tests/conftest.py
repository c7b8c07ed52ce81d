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


@pytest.fixture(params=["avx512", "avx2", "portable"])
def isa(request):
    """Runs the test on each instruction-set path: AVX-512 and AVX2+FMA (each skipped, with the reason,
    on CPUs without it) and the portable path, which every x86-64 CPU runs."""
    return _use_isa(request, request.param)


@pytest.fixture
def portable_isa(request):
    """The portable (baseline x86-64) kernels for the duration of one test."""
    return _use_isa(request, "portable")


@pytest.fixture(params=["auto", "gemm"])
def algorithm(request):
    """Runs the test under each convolution algorithm: 'auto' (the Winograd paths where they apply) and
    'gemm' (none of them); the finalizer restores the previous one."""
    previous = _pykernels_cpu.conv_algorithm()
    request.addfinalizer(lambda: _pykernels_cpu.set_conv_algorithm(previous))
    _pykernels_cpu.set_conv_algorithm(request.param)
    return request.param
