#!/bin/sh
# Entry point of the agent image, installed as /usr/local/bin/pycilium-agent (ahead of the virtualenv
# on PATH). It picks the kernel headers bcc compiles the datapath against, then execs the real agent.
#
# bcc looks for headers under /lib/modules/$(uname -r)/{build,source}, then in the kernel's own
# /sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS). The Helm chart mounts the host's /lib/modules and
# /usr/src read-only so those links resolve exactly as on the host. Only when the host has neither
# do we point BCC_KERNEL_SOURCE at the generic Debian headers bundled in the image: the datapath
# only uses stable UAPI structures (skb, IP, TCP, UDP headers, BPF helpers), so headers of another
# kernel version compile the same programs. A BCC_KERNEL_SOURCE set by the operator always wins.
set -eu

FALLBACK_HEADERS=/opt/pycilium/kernel-headers

has_headers() {
	# Mirrors bcc's own lookup: with both build/ and source/ it compiles from source/.
	kdir="/lib/modules/$(uname -r)"
	if [ -d "$kdir/build" ] && [ -d "$kdir/source" ]; then
		[ -f "$kdir/source/include/linux/kconfig.h" ]
	else
		[ -f "$kdir/build/include/linux/kconfig.h" ]
	fi
}

if [ -z "${BCC_KERNEL_SOURCE:-}" ]; then
	if has_headers; then
		:
	elif [ -e /sys/kernel/kheaders.tar.xz ]; then
		:
	elif [ -f "$FALLBACK_HEADERS/include/linux/kconfig.h" ]; then
		echo "pycilium-agent: no kernel headers for $(uname -r) on the host; using the image's" \
			"$(cat "$FALLBACK_HEADERS/.pycilium-headers" 2>/dev/null || echo generic headers)" >&2
		BCC_KERNEL_SOURCE="$FALLBACK_HEADERS"
		export BCC_KERNEL_SOURCE
	fi
fi

exec /opt/pycilium/venv/bin/pycilium-agent "$@"
