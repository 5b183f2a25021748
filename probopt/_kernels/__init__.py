"""Fused kernels: small C loops for CPU (:mod:`probopt._kernels.cpu`)."""
