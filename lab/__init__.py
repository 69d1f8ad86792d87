"""pycilium lab."""
