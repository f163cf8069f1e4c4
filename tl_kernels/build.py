"""``python -m tl_kernels.build`` (what ``make kernels`` runs): compile every shipped kernel configuration with a
resource report. The build lives in :mod:`tl_kernels.tools.build`; this entry point keeps the documented command."""

from .tools.build import main

if __name__ == "__main__":
    raise SystemExit(main())
