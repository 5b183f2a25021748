"""Ray workers that score examples for importance sampling (extra: ``probopt[distributed]``)."""
