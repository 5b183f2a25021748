"""ArviZ diagnostics of posterior gradient uncertainty (``pip install probopt[diagnostics]``)."""
