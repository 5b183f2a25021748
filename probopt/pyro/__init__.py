"""Pyro adapters: PyroOptim factories for probopt's optimizers."""
