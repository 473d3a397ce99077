"""flash-attn-kernel: the pipeline that turns this repository into published Kernel Hub kernels.

Stages, one module each: project (build.toml), plan (variants), toolchain, compile,
layout (variant directories), check, publish, bench; `cli` is the command-line entry.
"""

__version__ = "0.1.0"
