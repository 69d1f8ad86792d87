/* SPDX-License-Identifier: Apache-2.0 */
/* IPv4 parsing into a flat tuple with bounds checks; offsets kept for later rewrites. */
#ifndef PYCILIUM_PARSE_H
#define PYCILIUM_PARSE_H

#include "common.h"
#include "events.h"

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

struct pkt4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport; /* ICMP echo request: id; echo reply: 0 */
	__be16 dport; /* ICMP echo request: 0; echo reply: id */
	__u8 proto;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 is_fragment; /* a non-first fragment: no L4 header */
	__u32 l4_off;     /* offset of the L4 header from the start of the frame */
	__u32 len;
	__u32 now;        /* monotonic seconds, read once per packet */
};

/* 0 on success, else a DROP_* reason. Non-IPv4 frames return -1. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt4 *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4;
	__u32 ihl;

	if ((void *)(eth + 1) > data_end)
		return DROP_INVALID;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	ip4 = (void *)(eth + 1);
	if ((void *)(ip4 + 1) > data_end)
		return DROP_INVALID;
	ihl = ip4->ihl * 4;
	if (ihl < sizeof(*ip4) || ihl > 60)
		return DROP_INVALID;
	p->saddr = ip4->saddr;
	p->daddr = ip4->daddr;
	p->proto = ip4->protocol;
	p->l4_off = ETH_HLEN + ihl;
	p->len = skb->len;
	p->now = mono_seconds();
	p->sport = 0;
	p->dport = 0;
	p->tcp_flags = 0;
	p->icmp_type = 0;
	p->is_fragment = (ip4->frag_off & bpf_htons(0x1fff)) != 0;
	if (p->is_fragment)
		return 0;

	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = data + p->l4_off;
		if ((void *)(th + 1) > data_end)
			return DROP_INVALID;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = data + p->l4_off;
		if ((void *)(uh + 1) > data_end)
			return DROP_INVALID;
		p->sport = uh->source;
		p->dport = uh->dest;
	} else if (p->proto == IPPROTO_ICMP) {
		struct icmphdr *ih = data + p->l4_off;
		if ((void *)(ih + 1) > data_end)
			return DROP_INVALID;
		p->icmp_type = ih->type;
		if (ih->type == ICMP_ECHO)
			p->sport = ih->un.echo.id;
		else if (ih->type == ICMP_ECHOREPLY)
			p->dport = ih->un.echo.id;
	}
	return 0;
}

static __always_inline void pkt_flow_info(const struct pkt4 *p, struct flow_info *fi)
{
	fi->saddr = p->saddr;
	fi->daddr = p->daddr;
	fi->sport = p->sport;
	fi->dport = p->dport;
	fi->proto = p->proto;
	fi->tcp_flags = p->tcp_flags;
}

/* Does the protocol carry ports we translate (TCP/UDP)? ICMP echo ids are kept as they are. */
static __always_inline int has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP;
}

#endif /* PYCILIUM_PARSE_H */
