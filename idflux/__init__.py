"""idflux: identity-consistent multi-person FLUX generation and training (the WithAnyone method).

The three hot paths live in :mod:`idflux.kernels` (``region_attention``, ``cosine_infonce``,
``face_warp``), each with a Triton kernel for CUDA and an exact PyTorch reference.
"""

__version__ = "0.1.0"
