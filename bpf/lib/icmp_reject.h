/* SPDX-License-Identifier: Apache-2.0 */
/* Turn the packet into an ICMP "port unreachable" answer to its sender, as a service without
 * backends answers (a TCP connect() then fails at once with ECONNREFUSED instead of hanging). */
#ifndef PYCILIUM_ICMP_REJECT_H
#define PYCILIUM_ICMP_REJECT_H

#include "parse.h"
#include "events.h"

#define ICMP_REJECT_QUOTE 28 /* original IPv4 header (no options) + 8 bytes of L4 */
#define ICMP_REJECT_LEN (ETH_HLEN + sizeof(struct iphdr) + sizeof(struct icmphdr) + ICMP_REJECT_QUOTE)

static __always_inline __u16 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Rewrites skb in place; the caller redirects it back out of the interface it came from.
 * 0 or a DROP_* reason. */
static __always_inline int icmp_build_port_unreachable(struct __sk_buff *skb, const struct pkt4 *p)
{
	__u8 quote[ICMP_REJECT_QUOTE];
	struct ethhdr eth;
	struct iphdr ip = {};
	struct icmphdr icmp = {};
	__u8 tmp[ETH_ALEN];
	__u32 csum;

	if (p->l4_off != ETH_HLEN + sizeof(struct iphdr))
		return DROP_INVALID; /* IP options: not answered */
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return DROP_INVALID;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, quote, sizeof(quote)) < 0)
		return DROP_INVALID;
	if (bpf_skb_change_tail(skb, ICMP_REJECT_LEN, 0) < 0)
		return DROP_WRITE_ERROR;

	__builtin_memcpy(tmp, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, tmp, ETH_ALEN);

	ip.version = 4;
	ip.ihl = 5;
	ip.ttl = 64;
	ip.protocol = IPPROTO_ICMP;
	ip.tot_len = bpf_htons(sizeof(ip) + sizeof(icmp) + ICMP_REJECT_QUOTE);
	ip.saddr = p->daddr;
	ip.daddr = p->saddr;
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0);
	ip.check = csum_fold32(csum);

	icmp.type = ICMP_DEST_UNREACH;
	icmp.code = ICMP_PORT_UNREACH;
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&icmp, sizeof(icmp), 0);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)quote, sizeof(quote), csum);
	icmp.checksum = csum_fold32(csum);

	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &icmp, sizeof(icmp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip) + sizeof(icmp), quote, sizeof(quote), 0) < 0)
		return DROP_WRITE_ERROR;
	return 0;
}

/* A service without backends: count the drop, report it, and answer the client with ICMP port
 * unreachable sent back out of the interface the request came in on (or drop silently with
 * SERVICE_NO_BACKEND_DROP). Returns the program's verdict. */
static __always_inline int lb4_reject_no_backend(struct __sk_buff *skb, const struct pkt4 *p,
						 const struct flow_info *fi, __u32 ifindex, __u8 egress)
{
	update_metrics(skb->len, DROP_NO_SERVICE, METRIC_DIR_SERVICE);
	emit_event(skb, EVENT_DROP, DROP_NO_SERVICE, fi, skb->len, ifindex, 0, egress, __LINE__);
#ifndef SERVICE_NO_BACKEND_DROP
	if (icmp_build_port_unreachable(skb, p) == 0)
		return bpf_redirect(ifindex, 0);
#endif
	return TC_ACT_SHOT;
}

#endif /* PYCILIUM_ICMP_REJECT_H */
