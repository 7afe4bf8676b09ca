"""@triton.jit kernels and their autotune config factories only (no torch.nn, no torch.distributed)."""
