"""Backend kernels. Only flowkern.ops imports from here (through flowkern.backend.kernels)."""
