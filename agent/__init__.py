"""pycilium agent."""
