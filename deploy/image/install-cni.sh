#!/bin/sh
# Installs the CNI plugin from the image into a host CNI bin dir (the install-cni-binaries init
# container runs this with the host's cni.binPath mounted at $1).
#
# The bundle holds `pycilium-cni`, the static native launcher, and `pycilium-cni-py`, the Python
# plugin as a self-contained PyInstaller "onedir" build (a onefile build would unpack itself on every
# call) that the launcher execs, found next to the launcher's resolved path, when the agent cannot
# take an invocation. The bundle goes to <bin>/.pycilium-cni-<build-id>/ and <bin>/pycilium-cni
# becomes a relative symlink to its launcher, swapped with an atomic rename so a container runtime
# never sees a half-copied plugin. Reinstalling the same build is a no-op; bundles of other builds
# are removed afterwards.
set -eu

BIN_DIR="${1:?usage: pycilium-install-cni HOST_CNI_BIN_DIR}"
SRC="${PYCILIUM_CNI_BUNDLE:-/usr/local/lib/pycilium-cni}"
BUILD_ID="$(cat "$SRC/BUILD_ID")"
BUNDLE=".pycilium-cni-$BUILD_ID"

mkdir -p "$BIN_DIR"
if [ ! -x "$BIN_DIR/$BUNDLE/pycilium-cni" ] || [ ! -x "$BIN_DIR/$BUNDLE/pycilium-cni-py" ]; then
	tmp="$BIN_DIR/.pycilium-cni-tmp.$$"
	rm -rf "$tmp"
	cp -R --preserve=mode,timestamps "$SRC" "$tmp"
	mv "$tmp" "$BIN_DIR/$BUNDLE"
fi
ln -sfn "$BUNDLE/pycilium-cni" "$BIN_DIR/.pycilium-cni.link"
mv -T -f "$BIN_DIR/.pycilium-cni.link" "$BIN_DIR/pycilium-cni"

for old in "$BIN_DIR"/.pycilium-cni-*; do
	[ -e "$old" ] || continue
	[ "$old" = "$BIN_DIR/$BUNDLE" ] && continue
	rm -rf "$old"
done
echo "installed pycilium-cni ($BUILD_ID) into $BIN_DIR"
