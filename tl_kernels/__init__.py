"""TileLang programs for the mHC kernels (Sinkhorn, post/res mapping, ...).

Nothing is compiled at import. Each kernel family lives in its own module with its forward and backward programs:

* ``<family>_<fwd|bwd>_program(**config)`` builds the TileLang ``PrimFunc`` (pure, cheap, no nvcc);
* ``<family>_<fwd|bwd>_kernel(**config)`` compiles it for the pinned target (memoised in memory, and on disk by
  TileLang's cache) and returns the callable kernel.

``tl_kernels.registry`` lists every configuration the package ships; ``python -m tl_kernels.build`` compiles them.
"""
