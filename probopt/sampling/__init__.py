"""Finite-population gradient estimation: sampling designs, survey estimators, auxiliary models."""
