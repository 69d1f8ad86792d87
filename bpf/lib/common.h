/* SPDX-License-Identifier: Apache-2.0 */
/* Includes, constants and small helpers every datapath program uses. */
#ifndef PYCILIUM_COMMON_H
#define PYCILIUM_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* Node settings compiled in by the loader (bpf/node_defines.py); defaults for tests. */
#ifndef NODE_IP
#define NODE_IP 0
#endif
#ifndef NODEPORT_MIN
#define NODEPORT_MIN 30000
#endif
#ifndef NODEPORT_MAX
#define NODEPORT_MAX 32767
#endif

/* Source file ids for drop events (printed by `pycilium monitor` as file:line). */
#define FILE_LXC 1
#define FILE_HOST 2
#define FILE_XDP 3
#define FILE_SOCK 4
#define FILE_OVERLAY 5
#ifndef THIS_FILE
#define THIS_FILE 0
#endif

static __always_inline __u32 mono_seconds(void)
{
	return (__u32)(bpf_ktime_get_ns() / 1000000000ULL);
}

#endif /* PYCILIUM_COMMON_H */
