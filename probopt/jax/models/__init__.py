"""Generative models of stochastic gradients as NumPyro programs, twins of :mod:`probopt.models`.

Each module mirrors its Pyro twin (same functions, same argument names, same closed forms):

=====================================================  ============================================
:mod:`probopt.jax.models.vsgd`                         VSGD's model, guides and CAVI update
:mod:`probopt.jax.models.student_t`                    VSGD with heavy-tailed (Student-t) noise
:mod:`probopt.jax.models.finite_population`            a finite population under a linear model
:mod:`probopt.jax.models.auxiliary_regression`         Bayesian regression of gradients on h_k
=====================================================  ============================================
"""

from probopt._optional import require

require("numpyro", "the NumPyro models (probopt.jax.models)")
