"""The multi-node lab (see lab.py): namespaces and processes, the API endpoint, helpers for the CLI."""
