"""pycilium cli."""
