"""mHC (Manifold-Constrained Hyper-Connections, arXiv 2512.24880) as PyTorch custom ops over TileLang kernels.

Public API:

* :func:`pre_mapping` - Eq. 14-19 and F_pre: ``residual [..., n, C] -> (layer_input, h_post, h_res)``;
* :func:`sinkhorn` - Eq. 9 with its exact unrolled backward;
* :func:`post_res` - F_post,res (Eq. 3): ``x_next = h_res @ x + h_post^T layer_output``;
* :mod:`mhc.reference` - the same math in plain PyTorch (the specification);
* :mod:`mhc.ops` - the ``torch.ops.mhc.*`` custom ops (forward and backward);
* :func:`warmup` - compile the CUDA kernels a model will use before capturing a CUDA graph.

Importing registers the ops; nothing is compiled until a CUDA kernel is first called.
"""

from . import ops, reference
from ._cuda import warmup  # importing _cuda registers the TileLang kernels for CUDA tensors
from .functional import post_res, pre_mapping, sinkhorn
from .reference import SiteParams

__version__ = "0.1.0"

__all__ = ["SiteParams", "ops", "warmup", "post_res", "pre_mapping", "reference", "sinkhorn"]
