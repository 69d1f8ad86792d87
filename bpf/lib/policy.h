/* SPDX-License-Identifier: Apache-2.0 */
/* Policy by security identity: the LPM policy map per endpoint and direction, and the ipcache. */
#ifndef PYCILIUM_POLICY_H
#define PYCILIUM_POLICY_H

#include "parse.h"

/* Identity of an address: longest-prefix match in the ipcache; unknown addresses are world. */
static __always_inline __u32 ipcache_identity(__be32 addr, struct remote_endpoint_info **info)
{
	struct ipcache_key k = {};
	struct remote_endpoint_info *i;

	k.prefixlen = 32;
	k.addr = addr;
	i = map_lookup(ipcache, &k);
	if (info)
		*info = i;
	return i ? i->sec_identity : ID_WORLD;
}

static __always_inline struct policy_entry *policy_lookup(__u16 ep_id, __u32 remote_id, __u8 egress, __u8 proto,
							  __be16 dport)
{
	struct policy_key k = {};

	k.prefixlen = POLICY_FULL_PREFIX;
	k.sec_label = remote_id;
	k.ep_id = ep_id;
	k.egress = egress;
	k.protocol = proto;
	k.dport = dport;
	return map_lookup(policy, &k);
}

/* 0: allowed; DROP_POLICY: no rule allows it; DROP_POLICY_DENY: a deny rule matched. */
static __always_inline int policy_can_access(__u16 ep_id, __u32 remote_id, __u8 egress, const struct pkt4 *p)
{
	__be16 port = has_ports(p->proto) ? p->dport : 0;
	struct policy_entry *exact = policy_lookup(ep_id, remote_id, egress, p->proto, port);
	struct policy_entry *any = policy_lookup(ep_id, 0, egress, p->proto, port);
	struct policy_entry *hit;

	if ((exact && (exact->flags & POLICY_F_DENY)) || (any && (any->flags & POLICY_F_DENY)))
		return DROP_POLICY_DENY;
	hit = exact ? exact : any;
	if (!hit)
		return DROP_POLICY;
	__sync_fetch_and_add(&hit->packets, 1);
	__sync_fetch_and_add(&hit->bytes, p->len);
	return 0;
}

#endif /* PYCILIUM_POLICY_H */
