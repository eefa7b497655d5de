"""numba.cuda kernel sources, one concern per module.

Serving never imports these: `build.py` compiles them ahead of time into per-architecture
cubins (plus PTX) under `prebuilt/`, which `zse_runtime.gpu` loads through the driver API.
Each module lists its kernels and their exact signatures in `KERNELS`.
"""
