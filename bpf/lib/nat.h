/* SPDX-License-Identifier: Apache-2.0 */
/* Source NAT to the node IP in BPF (masquerade, and NodePort traffic to remote backends), with
 * both directions of every flow in snat_v4_external:
 *   OUT {orig tuple}                         -> {node IP, allocated port}
 *   IN  {peer, node IP, peer port, alloc port} -> {orig source, orig source port}
 * The port is kept when it is free and inside the range, else chosen at random, retrying on a
 * collision (the IN entry is inserted with BPF_NOEXIST, so two flows never share a mapping). */
#ifndef PYCILIUM_NAT_H
#define PYCILIUM_NAT_H

#include "csum.h"
#include "conntrack.h"

#ifndef SNAT_PORT_MIN
#define SNAT_PORT_MIN 32768
#endif
#ifndef SNAT_PORT_MAX
#define SNAT_PORT_MAX 65535
#endif
#define SNAT_COLLISION_RETRIES 32


/* Find or create the mapping for an outgoing packet; *port gets the translated source port. */
static __always_inline int snat_v4_mapping(const struct pkt4 *p, __be32 nat_addr, __be16 *port)
{
	struct ct4_key out = {}, in = {};
	struct nat4_entry *ent, oval = {}, ival = {};
	__u32 range = SNAT_PORT_MAX - SNAT_PORT_MIN + 1;
	__u16 cand = bpf_ntohs(p->sport);
	__u64 now = p->now;
	int i, found = 0;

	ct_key_of(p, 0, CT_DIR_OUT, &out);
	ent = map_lookup(snat_v4_external, &out);
	if (ent) {
		*port = ent->to_port;
		return 0;
	}
	in.saddr = p->daddr;
	in.daddr = nat_addr;
	in.sport = p->dport;
	in.nexthdr = p->proto;
	in.flags = CT_DIR_IN;
	ival.created = now;
	ival.to_addr = p->saddr;
	ival.to_port = p->sport;
	ival.needs_ct = 1;
	if (!has_ports(p->proto)) {
		/* ICMP echo: the identifier is kept (address-only translation) */
		in.dport = p->sport;
		if (map_update(snat_v4_external, &in, &ival, BPF_NOEXIST) < 0)
			return DROP_NAT_NO_MAPPING;
		*port = p->sport;
	} else {
		if (cand < SNAT_PORT_MIN || cand > SNAT_PORT_MAX)
			cand = SNAT_PORT_MIN + (__u16)(bpf_get_prandom_u32() % range);
		for (i = 0; i < SNAT_COLLISION_RETRIES; i++) {
			in.dport = bpf_htons(cand);
			if (map_update(snat_v4_external, &in, &ival, BPF_NOEXIST) == 0) {
				found = 1;
				break;
			}
			cand = i == 0 ? SNAT_PORT_MIN + (__u16)(bpf_get_prandom_u32() % range)
				      : (cand >= SNAT_PORT_MAX ? SNAT_PORT_MIN : cand + 1);
		}
		if (!found)
			return DROP_NAT_NO_MAPPING;
		*port = bpf_htons(cand);
	}
	oval.created = now;
	oval.to_addr = nat_addr;
	oval.to_port = *port;
	oval.needs_ct = 1;
	if (map_update(snat_v4_external, &out, &oval, BPF_ANY) < 0) {
		map_delete(snat_v4_external, &in);
		return DROP_NAT_NO_MAPPING;
	}
	return 0;
}

static __always_inline int snat_v4(struct __sk_buff *skb, struct pkt4 *p, __be32 nat_addr)
{
	__be16 port = 0;
	int ret = snat_v4_mapping(p, nat_addr, &port);

	if (ret)
		return ret;
	return rewrite_addr_port(skb, p, 1, nat_addr, port);
}

/* Reverse translation of a packet addressed to the node: 1 if translated, 0 if no mapping. */
static __always_inline int snat_v4_rev(struct __sk_buff *skb, struct pkt4 *p, int *err)
{
	struct ct4_key in = {};
	struct nat4_entry *ent;
	__be32 addr;
	__be16 port;

	in.saddr = p->saddr;
	in.daddr = p->daddr;
	in.sport = p->sport;
	in.dport = p->dport;
	in.nexthdr = p->proto;
	in.flags = CT_DIR_IN;
	ent = map_lookup(snat_v4_external, &in);
	if (!ent)
		return 0;
	addr = ent->to_addr;
	port = ent->to_port;
	*err = rewrite_addr_port(skb, p, 0, addr, port);
	return 1;
}

#endif /* PYCILIUM_NAT_H */
