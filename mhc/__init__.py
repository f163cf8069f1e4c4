"""mHC (Manifold-Constrained Hyper-Connections, arXiv 2512.24880) as PyTorch custom ops over TileLang kernels.

Public API:

* :func:`pre_mapping` - Eq. 14-19 and F_pre: ``residual [..., n, C] -> (layer_input, h_post, h_res)``;
* :func:`sinkhorn` - Eq. 9 with its exact unrolled backward;
* :func:`post_res` - F_post,res (Eq. 3): ``x_next = h_res @ x + h_post^T layer_output``;
* :mod:`mhc.reference` - the same math in plain PyTorch (the specification);
* :mod:`mhc.ops` - the ``torch.ops.mhc.*`` custom ops (forward and backward);
* :func:`warmup` - compile the CUDA kernels a model will use before capturing a CUDA graph;
* :class:`MHC` - the layer: wraps a sublayer (attention or FFN) into one residual site (:mod:`mhc.layer`), with
  :func:`expand`, :func:`collapse`, :class:`MHCHead` and the mixed-precision policy :class:`Precision`;
* :mod:`mhc.boundary` - site l's F_post,res fused with site l+1's pre-mapping (``mhc.boundary.boundary``);
* :class:`MHCStack` - a stack of sites with the paper's block recomputation (:mod:`mhc.recompute`, Eq. 20);
* :mod:`mhc.diagnostics` - Amax gain magnitudes and Sinkhorn residuals, collected without host syncs.

Importing registers the ops (TileLang kernels for CUDA, the fast exp-domain kernels of :mod:`mhc._cpu` for the CPU);
nothing is compiled until a CUDA kernel is first called.
"""

from . import _cpu, boundary, diagnostics, ops, reference  # noqa: F401  (_cpu, boundary: register kernels, ops)
from ._cuda import warmup  # importing _cuda registers the TileLang kernels for CUDA tensors
from .functional import post_res, pre_mapping, sinkhorn
from .layer import MHC, MHCContext, MHCHead, Precision, collapse, deepseek_to_mhc, expand
from .recompute import MHCStack, optimal_block
from .reference import SiteParams

__version__ = "0.1.0"

__all__ = [
    "MHC",
    "MHCContext",
    "MHCHead",
    "MHCStack",
    "Precision",
    "SiteParams",
    "boundary",
    "collapse",
    "deepseek_to_mhc",
    "diagnostics",
    "expand",
    "optimal_block",
    "ops",
    "post_res",
    "pre_mapping",
    "reference",
    "sinkhorn",
    "warmup",
]
