"""Agent side of the datapath: loading programs, conntrack GC, map pressure."""
