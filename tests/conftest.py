"""Test set-up: Triton's interpreter and an offline hub, set before anything imports idflux.

``triton.jit`` decides at definition time whether a kernel is interpreted, so these must be in the
environment before :mod:`idflux.kernels` is imported; a plain ``pytest`` therefore behaves like
``make test``. On a CUDA machine (the GPU suite) the interpreter stays off so the kernels compile.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch defines no Triton kernel)

# CPU machines interpret the kernels; a CUDA machine compiles them (unless the caller chose).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"idflux tests: TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} HF_HUB_OFFLINE=1 torch {torch.__version__}"
