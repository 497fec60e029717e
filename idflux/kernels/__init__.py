"""The three hot-path ops, each a Triton kernel with an exact PyTorch reference.

All take ``backend="auto" | "triton" | "torch"``: ``auto`` runs Triton on CUDA tensors and the
reference otherwise; ``triton`` on CPU tensors runs Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from idflux.kernels.cosine_infonce import CosineInfoNCEFunction, cosine_infonce
from idflux.kernels.cosine_infonce_ref import cosine_infonce_ref
from idflux.kernels.face_warp import FaceWarpFunction, face_warp, face_warp_matrices, face_warp_valid
from idflux.kernels.face_warp_ref import face_warp_ref
from idflux.kernels.region_attention import region_attention, region_attention_packed
from idflux.kernels.region_attention_ref import region_attention_ref

__all__ = [
    "region_attention", "region_attention_packed", "region_attention_ref",
    "cosine_infonce", "cosine_infonce_ref", "CosineInfoNCEFunction",
    "face_warp", "face_warp_matrices", "face_warp_valid", "face_warp_ref", "FaceWarpFunction",
]
