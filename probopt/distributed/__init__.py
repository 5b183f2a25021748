"""Ray workers that score examples for importance sampling (``pip install probopt[distributed]``)."""
