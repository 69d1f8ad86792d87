/* SPDX-License-Identifier: Apache-2.0 */
/* Monitor events (drop, trace, policy verdict) on the perf buffer, and the drop path that counts
 * every drop by reason before it happens. */
#ifndef PYCILIUM_EVENTS_H
#define PYCILIUM_EVENTS_H

#include "common.h"
#include "metrics.h"

/* What a program knows about the packet when it reports it. */
struct flow_info {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u16 ep_id;
	__u32 src_label;
	__u32 dst_label;
};

static __always_inline void emit_event(void *ctx, __u8 type, __u8 subtype, const struct flow_info *fi,
				       __u32 len, __u32 ifindex, __u8 ct_state, __u8 egress, __u16 line)
{
	struct monitor_event ev = {};

	ev.type = type;
	ev.subtype = subtype;
	ev.ifindex = ifindex;
	ev.orig_len = len;
	ev.ct_state = ct_state;
	ev.egress = egress;
	ev.line = line;
	ev.file = THIS_FILE;
	ev.ktime_ns = bpf_ktime_get_ns();
	if (fi) {
		ev.source = fi->ep_id;
		ev.src_label = fi->src_label;
		ev.dst_label = fi->dst_label;
		ev.saddr = fi->saddr;
		ev.daddr = fi->daddr;
		ev.sport = fi->sport;
		ev.dport = fi->dport;
		ev.proto = fi->proto;
		ev.tcp_flags = fi->tcp_flags;
	}
	bpf_perf_event_output(ctx, MAP(events), BPF_F_CURRENT_CPU, &ev, sizeof(ev));
}

/* Count the drop, report it, and return the verdict that drops. */
#define DROP(ctx, len, reason, dir, fi, ifindex, verdict)                                             \
	({                                                                                           \
		update_metrics((len), (reason), (dir));                                              \
		emit_event((ctx), EVENT_DROP, (reason), (fi), (len), (ifindex), 0, 0, __LINE__);     \
		(verdict);                                                                           \
	})

#endif /* PYCILIUM_EVENTS_H */
