"""Gradient estimators by name: one registry over every estimator module.

``"uniform"`` is :class:`~probopt.sampling.gradient_estimator.UniformEstimator`. Every module in
:data:`ESTIMATOR_REGISTRIES` provides ``make_estimator(name, **kwargs)`` and lists its names in
``ESTIMATOR_NAMES``; modules are imported when a name is looked up, so ``import probopt.sampling``
stays cheap and a missing optional dependency affects only its own estimators.
"""

from __future__ import annotations

import importlib
from typing import Any

from probopt.sampling.gradient_estimator import GradientEstimator, UniformEstimator

__all__ = ["ESTIMATOR_REGISTRIES", "estimator_names", "make_estimator"]

#: Modules that may provide ``make_estimator(name, **kw)``, tried in order after ``"uniform"``.
#: A module lists its names in ``ESTIMATOR_NAMES`` (or ``ESTIMATORS``: a mapping or sequence).
ESTIMATOR_REGISTRIES: tuple[str, ...] = (
    "probopt.sampling.model_assisted",
    "probopt.sampling.importance",
)


def _registry_modules() -> list[Any]:
    modules = []
    for name in ESTIMATOR_REGISTRIES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            if err.name is None or not name.startswith(err.name):
                raise  # the registry exists but one of its own imports is missing
    return modules


def _listed(module: Any) -> Any:
    for attr in ("ESTIMATOR_NAMES", "ESTIMATORS"):
        if hasattr(module, attr):
            return getattr(module, attr)
    return None


def estimator_names() -> tuple[str, ...]:
    """Names :func:`make_estimator` accepts: ``"uniform"`` and those the registries list.

    Example:
        >>> "uniform" in estimator_names()
        True
    """
    names = ["uniform"]
    for module in _registry_modules():
        names += [n for n in _listed(module) or () if n not in names]
    return tuple(names)


def make_estimator(name: str = "uniform", **kwargs: Any) -> GradientEstimator:
    """Build a gradient estimator by name.

    ``"uniform"`` is :class:`~probopt.sampling.gradient_estimator.UniformEstimator`; other names
    are looked up, lazily, with ``make_estimator(name, **kwargs)`` of the modules in
    :data:`ESTIMATOR_REGISTRIES`.

    Raises:
        ValueError: no registry knows ``name`` (the message lists the names that exist).

    Example:
        >>> make_estimator("uniform")
        UniformEstimator()
    """
    if name == "uniform":
        return UniformEstimator(**kwargs)
    for module in _registry_modules():
        factory = getattr(module, "make_estimator", None)
        listed = _listed(module)
        if factory is None or (listed is not None and name not in listed):
            continue
        if listed is not None:
            return factory(name, **kwargs)
        try:
            return factory(name, **kwargs)
        except (KeyError, ValueError):
            continue  # a registry without a list of names: its error means "not one of mine"
    raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(estimator_names())}")
