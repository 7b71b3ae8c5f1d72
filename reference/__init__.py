"""Pure-PyTorch references: the definition of correctness and the CPU fallback of every op."""
