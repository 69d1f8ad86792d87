/* SPDX-License-Identifier: Apache-2.0 */
/* Address and port rewrites that keep the IPv4 and L4 checksums valid (incremental updates). */
#ifndef PYCILIUM_CSUM_H
#define PYCILIUM_CSUM_H

#include "parse.h"

static __always_inline int l4_csum_off(const struct pkt4 *p, __u32 *off, __u64 *flags)
{
	if (p->proto == IPPROTO_TCP) {
		*off = p->l4_off + offsetof(struct tcphdr, check);
		*flags = 0;
		return 1;
	}
	if (p->proto == IPPROTO_UDP) {
		*off = p->l4_off + offsetof(struct udphdr, check);
		*flags = BPF_F_MARK_MANGLED_0; /* a zero UDP checksum means "none": keep it so */
		return 1;
	}
	return 0;
}

/* One's-complement incremental checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')). The sums work
 * on the raw 16-bit words, so byte order does not matter as long as it is the packet's. */
static __always_inline __u16 csum_fold16(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

static __always_inline __u16 csum_update32(__u16 check, __u32 from, __u32 to)
{
	__u32 s = (__u16)~check;

	s += (~from & 0xffff) + (~from >> 16);
	s += (to & 0xffff) + (to >> 16);
	return (__u16)~csum_fold16(s);
}

static __always_inline __u16 csum_update16(__u16 check, __u16 from, __u16 to)
{
	__u32 s = (__u16)~check;

	s += (__u16)~from;
	s += to;
	return (__u16)~csum_fold16(s);
}

/* Fast path: write headers directly and fix checksums arithmetically. -1 when the headers are not
 * in the linear part of the packet (the caller then uses the helper path). */
static __always_inline int rewrite_direct(struct __sk_buff *skb, struct pkt4 *p, int is_src, __be32 new_addr,
					  __be16 new_port)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip4 = data + ETH_HLEN;
	__u32 off = p->l4_off;
	__be32 old_addr;
	__be16 old_port;

	if ((void *)(ip4 + 1) > data_end || off > ETH_HLEN + 60)
		return -1;
	old_addr = is_src ? ip4->saddr : ip4->daddr;
	if (!p->is_fragment && p->proto == IPPROTO_TCP) {
		struct tcphdr *th = data + off;
		__u16 c;
		if ((void *)(th + 1) > data_end)
			return -1;
		c = th->check;
		old_port = is_src ? th->source : th->dest;
		c = csum_update32(c, old_addr, new_addr);
		if (new_port && new_port != old_port) {
			c = csum_update16(c, old_port, new_port);
			if (is_src)
				th->source = new_port;
			else
				th->dest = new_port;
		}
		th->check = c;
	} else if (!p->is_fragment && p->proto == IPPROTO_UDP) {
		struct udphdr *uh = data + off;
		__u16 c;
		if ((void *)(uh + 1) > data_end)
			return -1;
		c = uh->check;
		old_port = is_src ? uh->source : uh->dest;
		if (c) { /* zero: no checksum, keep it so */
			c = csum_update32(c, old_addr, new_addr);
			if (new_port && new_port != old_port)
				c = csum_update16(c, old_port, new_port);
			uh->check = c ? c : 0xffff;
		}
		if (new_port && new_port != old_port) {
			if (is_src)
				uh->source = new_port;
			else
				uh->dest = new_port;
		}
	}
	ip4->check = csum_update32(ip4->check, old_addr, new_addr);
	if (is_src)
		ip4->saddr = new_addr;
	else
		ip4->daddr = new_addr;
	if (is_src) {
		p->saddr = new_addr;
		if (new_port && has_ports(p->proto) && !p->is_fragment)
			p->sport = new_port;
	} else {
		p->daddr = new_addr;
		if (new_port && has_ports(p->proto) && !p->is_fragment)
			p->dport = new_port;
	}
	return 0;
}

/* Helper-based rewrite (any skb layout). */
static __always_inline int rewrite_addr_port_helpers(struct __sk_buff *skb, struct pkt4 *p, int is_src, __be32 new_addr,
					     __be16 new_port)
{
	__be32 old_addr = is_src ? p->saddr : p->daddr;
	__be16 old_port = is_src ? p->sport : p->dport;
	__u32 addr_off = is_src ? IP_SRC_OFF : IP_DST_OFF;
	__u32 csum_off = 0;
	__u64 l4flags = 0;
	int has_l4 = !p->is_fragment && l4_csum_off(p, &csum_off, &l4flags);

	if (old_addr != new_addr) {
		if (has_l4 && bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
						  l4flags | BPF_F_PSEUDO_HDR | sizeof(new_addr)) < 0)
			return DROP_CSUM_L3;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0)
			return DROP_CSUM_L3;
		if (bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0) < 0)
			return DROP_WRITE_ERROR;
		if (is_src)
			p->saddr = new_addr;
		else
			p->daddr = new_addr;
	}
	if (has_l4 && has_ports(p->proto) && old_port != new_port && new_port) {
		__u32 port_off = p->l4_off + (is_src ? 0 : 2); /* source/dest are the first 4 bytes of TCP and UDP */
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4flags | sizeof(new_port)) < 0)
			return DROP_CSUM_L3;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0) < 0)
			return DROP_WRITE_ERROR;
		if (is_src)
			p->sport = new_port;
		else
			p->dport = new_port;
	}
	return 0;
}

/* Rewrite the source (is_src) or destination address and, for TCP/UDP, port. */
static __always_inline int rewrite_addr_port(struct __sk_buff *skb, struct pkt4 *p, int is_src, __be32 new_addr,
					     __be16 new_port)
{
	if (rewrite_direct(skb, p, is_src, new_addr, new_port) == 0)
		return 0;
	return rewrite_addr_port_helpers(skb, p, is_src, new_addr, new_port);
}

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

static __always_inline int set_macs(struct __sk_buff *skb, const __u8 *smac, const __u8 *dmac)
{
	if (bpf_skb_store_bytes(skb, 0, dmac, ETH_ALEN, 0) < 0)
		return DROP_WRITE_ERROR;
	if (bpf_skb_store_bytes(skb, ETH_ALEN, smac, ETH_ALEN, 0) < 0)
		return DROP_WRITE_ERROR;
	return 0;
}

#endif /* PYCILIUM_CSUM_H */
