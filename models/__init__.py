"""Generative models of stochastic gradients, written as plain Pyro programs.

Installed as :mod:`probopt.models`. Each module is readable as its paper's equations: a ``model``
and a ``guide``, and where one exists the closed-form update that an optimizer uses.
"""
