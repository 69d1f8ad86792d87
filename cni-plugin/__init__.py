"""pycilium cni-plugin."""
