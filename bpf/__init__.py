"""pycilium bpf."""
