"""The CPU backend: numba-compiled kernels over the same `.zse` file, for machines without a GPU."""
