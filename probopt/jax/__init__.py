"""The JAX backend: NumPyro models and optax transforms (extra: ``probopt[jax]``)."""
