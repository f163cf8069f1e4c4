"""Build and inspection tooling for the TileLang programs of :mod:`tl_kernels` (none of it is a tile program).

* :mod:`.build` - compile every shipped configuration (:data:`tl_kernels.registry.ALL_CONFIGS`) into TileLang's
  disk cache with a resource report; ``python -m tl_kernels.build`` (``make kernels``) runs it.
* :mod:`.codegen` - generated CUDA source, PTX, ``ptxas -v`` figures, SASS and its loops, without a GPU.
* :mod:`.sinkhorn_sass`, :mod:`.pre_mapping_sass` - per-token SASS counts of the Sinkhorn and pre-mapping kernels,
  which the SASS guards in ``tests/kernels/test_sass.py`` assert.
"""
