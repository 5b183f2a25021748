"""The JAX backend: NumPyro models and optax GradientTransformations (``pip install probopt[jax]``)."""
