"""The CUDA backend: prebuilt kernels launched through the driver API, decode replayed as CUDA
graphs, weights in one device allocation. Imports cuda.bindings only (never numba)."""
