# syntax=docker/dockerfile:1
#
# The pycilium agent image: the agent, the `pycilium` CLI and the CNI plugin, run by the Helm chart in
# deploy/helm/pycilium.
#
#   docker build -t pycilium:dev .
#
# Stages:
#   cni             the CNI plugin for the *host* (the container runtime execs it from /opt/cni/bin),
#                   where neither this image's Python nor its virtualenv exists: `pycilium-cni` is the
#                   static native launcher (cni-plugin/shim/pycilium-cni.c, starts in ~1 ms and hands
#                   the invocation to the agent's socket), `pycilium-cni-py` next to it the Python
#                   plugin as a self-contained PyInstaller bundle that the launcher execs whenever the
#                   agent cannot take the call (VERSION, agent down: DEL queued, ADD "try again"). The
#                   bundle is built on Debian 11 so that it runs on hosts with glibc >= 2.31 (Ubuntu
#                   20.04+, Debian 11+, RHEL 9, kind and most managed-Kubernetes node images); the
#                   launcher is static and runs anywhere.
#   venv            the pycilium package and its dependencies in a virtualenv made with
#                   --system-site-packages, so Debian's bcc module (python3-bpfcc) is importable.
#   kernel-headers  Debian's generic kernel headers, merged into one tree: the fallback bcc compiles
#                   against when the host has no headers (see deploy/image/pycilium-agent.sh).
#   (final)         Debian 12 with bcc, iproute2 and the three pieces above.
#
# The image runs as root on purpose: loading BPF programs, attaching them to TC and XDP, pinning maps
# in bpffs and configuring pod network namespaces need root plus capabilities (the chart adds exactly
# those and drops the rest). A non-root user cannot do any of it, so there is no USER instruction.

ARG DEBIAN_IMAGE=debian:12.12-slim
ARG CNI_BUILDER_IMAGE=python:3.11.13-slim-bullseye
ARG PYINSTALLER_VERSION=6.22.3

# ---------------------------------------------------------------------------------------------------
FROM ${CNI_BUILDER_IMAGE} AS cni
ARG PYINSTALLER_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
SHELL ["/bin/bash", "-eo", "pipefail", "-c"]
# PyInstaller needs objdump (binutils) to analyse shared libraries; gcc and libc6-dev (libc.a) build
# the static native launcher.
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir "pyinstaller==${PYINSTALLER_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY agent/ agent/
COPY bpf/ bpf/
COPY cli/ cli/
COPY cni-plugin/ cni-plugin/
COPY lab/ lab/
# --no-deps: the plugin must be standard-library only (it is exec'd for every pod operation and talks
# to the agent over a unix socket). A third-party import would make the smoke test below fail.
RUN pip install --no-cache-dir --no-deps . \
    && printf 'from pycilium.cni.main import main\nraise SystemExit(main())\n' > /tmp/pycilium_cni_entry.py \
    && pyinstaller --onedir --noconfirm --clean --name pycilium-cni-py \
        --collect-submodules pycilium.cni \
        --distpath /tmp/dist --workpath /tmp/pyinstaller-work --specpath /tmp/pyinstaller-work \
        /tmp/pycilium_cni_entry.py \
    && mkdir -p /out && mv /tmp/dist/pycilium-cni-py /out/pycilium-cni \
    && gcc -O2 -static -o /out/pycilium-cni/pycilium-cni cni-plugin/shim/pycilium-cni.c \
    && printf '{"cniVersion":"1.1.0"}' > /tmp/version-request.json \
    && CNI_COMMAND=VERSION /out/pycilium-cni/pycilium-cni-py < /tmp/version-request.json \
    && CNI_COMMAND=VERSION /out/pycilium-cni/pycilium-cni < /tmp/version-request.json \
    && tar -C /out/pycilium-cni --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - . \
        | sha256sum | cut -c1-16 > /out/pycilium-cni/BUILD_ID

# ---------------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY agent/ agent/
COPY bpf/ bpf/
COPY cli/ cli/
COPY cni-plugin/ cni-plugin/
COPY lab/ lab/
RUN python3 -m venv --system-site-packages /opt/pycilium/venv \
    && /opt/pycilium/venv/bin/pip install --no-cache-dir .

# ---------------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS kernel-headers
SHELL ["/bin/bash", "-eo", "pipefail", "-c"]
WORKDIR /tmp/headers
# Download (not install) the headers linux-headers-amd64 points at: installing would pull in gcc and
# kbuild, which bcc does not use. Debian splits them into -common and -amd64 trees; bcc's
# BCC_KERNEL_SOURCE takes one directory, so both are merged into /out/kernel-headers (x86 only).
RUN apt-get update \
    && arch_pkg="$(apt-cache depends linux-headers-amd64 \
        | awk '/Depends: linux-headers-.*-amd64$/ { print $2; exit }')" \
    && common_pkg="${arch_pkg%-amd64}-common" \
    && apt-get download "$arch_pkg" "$common_pkg" \
    && for deb in ./*.deb; do dpkg-deb -x "$deb" root; done \
    && mkdir -p /out/kernel-headers \
    && cp -a "root/usr/src/$common_pkg/." /out/kernel-headers/ \
    && cp -a "root/usr/src/$arch_pkg/." /out/kernel-headers/ \
    && find /out/kernel-headers/arch -mindepth 1 -maxdepth 1 ! -name x86 -exec rm -rf {} + \
    && rm -f /out/kernel-headers/scripts /out/kernel-headers/tools /out/kernel-headers/Module.symvers \
    && test -f /out/kernel-headers/include/linux/kconfig.h \
    && test -f /out/kernel-headers/include/generated/autoconf.h \
    && echo "$arch_pkg" > /out/kernel-headers/.pycilium-headers \
    && rm -rf /var/lib/apt/lists/* /tmp/headers/*

# ---------------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE}
LABEL org.opencontainers.image.title="pycilium" \
      org.opencontainers.image.description="pycilium agent, CLI and CNI plugin (Kubernetes networking with an eBPF datapath)" \
      org.opencontainers.image.licenses="Apache-2.0"
# python3-bpfcc: bcc (clang/LLVM) compiles and loads the datapath at agent start.
# iproute2: `ip`/`tc` for operators debugging from inside the pod.
# mount and util-linux (nsenter) are part of the base image and used by the chart's init containers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-bpfcc iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=venv /opt/pycilium/venv /opt/pycilium/venv
COPY --from=kernel-headers /out/kernel-headers /opt/pycilium/kernel-headers
COPY --from=cni /out/pycilium-cni /usr/local/lib/pycilium-cni
COPY --chmod=0755 deploy/image/pycilium-agent.sh /usr/local/bin/pycilium-agent
COPY --chmod=0755 deploy/image/install-cni.sh /usr/local/bin/pycilium-install-cni
# /usr/local/bin comes first: `pycilium-agent` is the header-selecting wrapper, `pycilium-cni` the
# native launcher (the plugin as the host runs it); `pycilium` (the CLI) comes from the virtualenv.
ENV PATH=/usr/local/sbin:/usr/local/bin:/opt/pycilium/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
RUN ln -s ../lib/pycilium-cni/pycilium-cni /usr/local/bin/pycilium-cni \
    && /opt/pycilium/venv/bin/python -c 'import bcc, pycilium.agent.config' \
    && command -v pycilium pycilium-agent pycilium-cni pycilium-install-cni
WORKDIR /
CMD ["pycilium-agent", "--config-dir=/etc/pycilium/config"]
