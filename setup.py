"""Maps the fixed top-level folders into one `pycilium` import namespace.

agent/ -> pycilium.agent, bpf/ -> pycilium.bpf, cli/ -> pycilium.cli, cni-plugin/ -> pycilium.cni,
lab/ -> pycilium.lab. Subpackages are discovered so a non-editable install (the image) is complete.
"""

from setuptools import find_packages, setup

ROOTS = {"agent": "agent", "bpf": "bpf", "cli": "cli", "cni": "cni-plugin", "lab": "lab"}

packages: list[str] = []
package_dir: dict[str, str] = {}
for name, folder in ROOTS.items():
    top = f"pycilium.{name}"
    packages.append(top)
    package_dir[top] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{top}.{sub}")
        package_dir[f"{top}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "pycilium.bpf": ["*.c", "lib/*.h"],
        "pycilium.agent": ["api/*.proto"],
        "pycilium.cni": ["shim/*.c"],
    },
)
