"""Custom operators of the native families, in pure PyTorch (fused kernels optional)."""
