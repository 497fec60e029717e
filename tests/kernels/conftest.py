"""Fixtures shared by the kernel tests."""

import importlib

import pytest


@pytest.fixture
def launch_grids(monkeypatch):
    """The (kernel name, grid) of every region_attention launch made during the test, in order."""
    kern = importlib.import_module("idflux.kernels.region_attention")._kernels()
    grids = []

    class Spy:
        def __init__(self, name, k):
            self.name, self.k = name, k

        def __getitem__(self, grid):
            grids.append((self.name, grid))
            return self.k[grid]

    for name in ("_region_attention_fwd", "_region_attention_bwd", "_region_attention_bwd_dkdv"):
        monkeypatch.setattr(kern, name, Spy(name, getattr(kern, name)))
    return grids
