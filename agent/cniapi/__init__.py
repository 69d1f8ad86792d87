"""The agent's CNI API: the plugin's unix-socket server, and installing the conflist and binary."""

from pycilium.agent.cniapi.install import (
    build_launcher,
    conflist,
    install_cni_binary,
    install_cni_config,
    remove_cni_config,
)
from pycilium.agent.cniapi.server import CNIServer, delete_queue_dir, format_result

__all__ = [
    "CNIServer",
    "build_launcher",
    "conflist",
    "delete_queue_dir",
    "format_result",
    "install_cni_binary",
    "install_cni_config",
    "remove_cni_config",
]
