/* SPDX-License-Identifier: Apache-2.0 */
/* Programs on the host side of every pod veth.
 *
 *   from_container: TC ingress of the host veth (packets leaving the pod): anti-spoofing, service
 *                   load-balancing with DNAT, conntrack, egress policy, forwarding to a local pod
 *                   (redirect) or to the stack (remote pods via node routes, the world).
 *   to_container:   TC egress of the host veth (packets entering the pod): conntrack, reverse NAT
 *                   of service replies, ingress policy.
 *
 * Everything per endpoint comes from maps keyed by the pod IP, so one compiled program serves
 * every pod of the node. */
#define THIS_FILE FILE_LXC
#include "common.h"
#include "events.h"
#include "csum.h"
#include "conntrack.h"
#include "lb.h"
#include "policy.h"
#include "icmp_reject.h"

#ifndef IPV4_LOOPBACK /* 169.254.42.1: source of hairpinned service traffic (a pod reaching itself) */
#define IPV4_LOOPBACK 0x012afea9
#endif
#ifndef NODEPORT_MIN
#define NODEPORT_MIN 30000
#endif
#ifndef POD_CIDR_ADDR /* unknown PodCIDR: every destination may be a local endpoint */
#define POD_CIDR_ADDR 0
#define POD_CIDR_MASK 0
#endif
#ifndef NODEPORT_MAX
#define NODEPORT_MAX 32767
#endif

#define MARK_MAGIC_MASK 0x0F00
#define MARK_HAIRPIN_REPLY 0x0E00 /* hairpin reply already translated and checked */

static __always_inline void trace(struct __sk_buff *skb, __u8 point, const struct flow_info *fi, __u8 ct_state,
				  __u32 ifindex)
{
#ifdef ENABLE_TRACE
	emit_event(skb, EVENT_TRACE, point, fi, skb->len, ifindex, ct_state, 0, 0);
#endif
}

static __always_inline void policy_verdict(struct __sk_buff *skb, const struct flow_info *fi, int verdict,
					   __u8 egress, __u32 ifindex)
{
	if (verdict) {
		emit_event(skb, EVENT_POLICY_VERDICT, (__u8)verdict, fi, skb->len, ifindex, CT_NEW, egress, 0);
		return; /* the drop itself is counted by DROP() */
	}
	update_metrics(skb->len, REASON_POLICY_ALLOWED, egress ? METRIC_DIR_EGRESS : METRIC_DIR_INGRESS);
#ifdef ENABLE_TRACE
	emit_event(skb, EVENT_POLICY_VERDICT, REASON_POLICY_ALLOWED, fi, skb->len, ifindex, CT_NEW, egress, 0);
#endif
}

/* Rewrite a reply of a service connection so the client sees the frontend address. */
static __always_inline int lb4_rev_nat(struct __sk_buff *skb, struct pkt4 *p, __u16 rev_nat_index)
{
	struct lb4_reverse_nat_key k = {};
	struct lb4_reverse_nat *rn;
	__be32 addr;

	k.rev_nat_index = rev_nat_index;
	rn = map_lookup(lb4_reverse_nat, &k);
	if (!rn)
		return 0; /* service gone: leave the packet as it is */
	addr = rn->address ? rn->address : NODE_IP;
	return rewrite_addr_port(skb, p, 1, addr, rn->port);
}

static __always_inline int redirect_to_endpoint(struct __sk_buff *skb, struct endpoint_info *dst)
{
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	__u32 ifindex = dst->ifindex;
	int ret;

	__builtin_memcpy(smac, dst->node_mac, ETH_ALEN);
	__builtin_memcpy(dmac, dst->mac, ETH_ALEN);
	ret = set_macs(skb, smac, dmac);
	if (ret)
		return -ret;
	return bpf_redirect(ifindex, 0);
}

int from_container(struct __sk_buff *skb)
{
	struct pkt4 p = {};
	struct flow_info fi = {};
	struct endpoint_key ek = {};
	struct endpoint_info *ep, *dst_ep;
	struct ct_entry *ct;
	__u32 ifindex = skb->ingress_ifindex;
	__u16 ep_id, ep_flags, rev_nat = 0, ct_flags = 0;
	__u32 ep_sec, backend_id = 0, remote_id;
	__u8 ct_state = CT_NEW;
	int ret, hairpin = 0;

	ret = parse_ipv4(skb, &p);
	if (ret < 0)
		return TC_ACT_OK; /* ARP, IPv6: the stack handles them */
	pkt_flow_info(&p, &fi);
	if (ret > 0)
		return DROP(skb, skb->len, ret, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT);

	ek.ip = p.saddr;
	ep = map_lookup(endpoints, &ek);
	if (!ep || ep->ifindex != ifindex)
		return DROP(skb, skb->len, DROP_INVALID_SIP, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT);
	ep_id = ep->lxc_id;
	ep_flags = ep->flags;
	ep_sec = ep->sec_id;
	fi.ep_id = ep_id;
	fi.src_label = ep_sec;
	if (!(ep_flags & EP_F_NO_MAC_CHECK)) {
		struct ethhdr *eth = (void *)(long)skb->data;
		if ((void *)(eth + 1) > (void *)(long)skb->data_end || !mac_equal(eth->h_source, ep->mac))
			return DROP(skb, skb->len, DROP_INVALID_SMAC, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT);
	}

	/* 1. Service load-balancing: DNAT to a backend. */
	if (!p.is_fragment && has_ports(p.proto)) {
		__be32 fe_addr = p.daddr;
		struct lb4_service *svc = lb4_lookup_service(p.daddr, p.dport, p.proto);
		__u16 port = bpf_ntohs(p.dport);

		if (!svc && NODE_IP && p.daddr == NODE_IP && port >= NODEPORT_MIN && port <= NODEPORT_MAX) {
			fe_addr = 0;
			svc = lb4_lookup_service(0, p.dport, p.proto);
		}
		if (svc) {
			struct lb4_result lb = {};
			__be32 baddr;
			__be16 bport;

			ret = lb4_local(&p, fe_addr, svc, 0, &lb);
			if (ret == DROP_NO_SERVICE)
				return lb4_reject_no_backend(skb, &p, &fi, ifindex, 1);
			if (ret)
				return DROP(skb, skb->len, ret, METRIC_DIR_SERVICE, &fi, ifindex, TC_ACT_SHOT);
			rev_nat = lb.rev_nat_index;
			backend_id = lb.backend_id;
			baddr = lb.backend->address;
			bport = lb.backend->port;
			hairpin = baddr == p.saddr;
			ret = rewrite_addr_port(skb, &p, 0, baddr, bport);
			if (!ret && hairpin) {
				ct_flags |= CT_F_LB_LOOPBACK;
				ret = rewrite_addr_port(skb, &p, 1, IPV4_LOOPBACK, 0);
			}
			if (ret)
				return DROP(skb, skb->len, ret, METRIC_DIR_SERVICE, &fi, ifindex, TC_ACT_SHOT);
		}
	}

	/* 2. Conntrack. */
	ct = ct_lookup4(&p, CT_EGRESS, &ct_state);
	pkt_flow_info(&p, &fi);

	if (ct_state == CT_NEW && p.daddr == IPV4_LOOPBACK) {
		/* Reply of a hairpinned connection: restore frontend and client, hand it back to the pod. */
		struct ct_entry *orig = ct_get(&p, 1, CT_DIR_OUT);

		if (!orig || !(orig->flags & CT_F_LB_LOOPBACK))
			return DROP(skb, skb->len, DROP_UNROUTABLE, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT);
		ct_refresh(orig, &p, 1);
		ret = lb4_rev_nat(skb, &p, orig->rev_nat_index);
		if (!ret)
			ret = rewrite_addr_port(skb, &p, 0, ek.ip, 0);
		if (ret)
			return DROP(skb, skb->len, ret, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT);
		update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_EGRESS);
		skb->mark = MARK_HAIRPIN_REPLY;
		ret = redirect_to_endpoint(skb, ep);
		return ret < 0 ? DROP(skb, skb->len, -ret, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT) : ret;
	}

	/* 3. Egress policy for new connections; replies and established flows skip it. */
	if (ct_state == CT_NEW || ct_state == CT_REOPENED) {
		/* the remote identity is only needed for new connections (an LPM lookup) */
		remote_id = ipcache_identity(p.daddr, NULL);
		fi.dst_label = remote_id;
		if ((ep_flags & EP_F_POLICY_EGRESS) && !hairpin) {
			ret = policy_can_access(ep_id, remote_id, POLICY_EGRESS, &p);
			policy_verdict(skb, &fi, ret, 1, ifindex);
			if (ret)
				return DROP(skb, skb->len, ret, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT);
		}
		if (ct_state == CT_NEW) {
			ret = ct_create4(&p, CT_DIR_OUT, rev_nat, backend_id, ep_sec, ct_flags, ifindex);
			if (ret)
				return DROP(skb, skb->len, ret, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT);
		} else if (ct) {
			ct->rev_nat_index = rev_nat;
			ct->backend_id = backend_id;
			ct->src_sec_id = ep_sec;
			ct->flags |= ct_flags;
		}
	} else if (ct && rev_nat && ct->rev_nat_index != rev_nat) {
		ct->rev_nat_index = rev_nat; /* the service behind an established tuple changed */
	}
	update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_EGRESS);
	trace(skb, TRACE_FROM_LXC, &fi, ct_state, ifindex);

	/* 4. Forward: local endpoints directly, everything else through the stack. Local endpoints
	 * all live in this node's PodCIDR (hairpin replies aside), so other destinations skip the lookup. */
	if ((p.daddr & POD_CIDR_MASK) != POD_CIDR_ADDR)
		return TC_ACT_OK;
	ek.ip = p.daddr;
	dst_ep = map_lookup(endpoints, &ek);
	if (dst_ep) {
		ret = redirect_to_endpoint(skb, dst_ep);
		return ret < 0 ? DROP(skb, skb->len, -ret, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT) : ret;
	}
	return TC_ACT_OK;
}

int to_container(struct __sk_buff *skb)
{
	struct pkt4 p = {};
	struct flow_info fi = {};
	struct endpoint_key ek = {};
	struct endpoint_info *ep;
	struct ct_entry *ct;
	__u32 ifindex = skb->ifindex;
	__u32 src_id;
	__u16 ep_id, ep_flags;
	__u8 ct_state = CT_NEW;
	int ret;

	ret = parse_ipv4(skb, &p);
	if (ret < 0)
		return TC_ACT_OK;
	pkt_flow_info(&p, &fi);
	if (ret > 0)
		return DROP(skb, skb->len, ret, METRIC_DIR_INGRESS, &fi, ifindex, TC_ACT_SHOT);

	ek.ip = p.daddr;
	ep = map_lookup(endpoints, &ek);
	if (!ep)
		return TC_ACT_OK; /* not addressed to an endpoint we manage */
	ep_id = ep->lxc_id;
	ep_flags = ep->flags;
	fi.ep_id = ep_id;
	fi.dst_label = ep->sec_id;

	if ((skb->mark & MARK_MAGIC_MASK) == MARK_HAIRPIN_REPLY) {
		skb->mark = 0;
		update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_INGRESS);
		return TC_ACT_OK;
	}
	if (p.saddr == IPV4_LOOPBACK) { /* hairpinned service request of this very pod */
		update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_INGRESS);
		return TC_ACT_OK;
	}
	/* ICMP errors (unreachable, time exceeded) relate to an existing flow: let them through. */
	if (p.proto == IPPROTO_ICMP && (p.icmp_type == ICMP_DEST_UNREACH || p.icmp_type == ICMP_TIME_EXCEEDED)) {
		update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_INGRESS);
		return TC_ACT_OK;
	}

	ct = ct_lookup4(&p, CT_INGRESS, &ct_state);

	if (ct_state == CT_REPLY) {
		if (ct && ct->rev_nat_index) {
			ret = lb4_rev_nat(skb, &p, ct->rev_nat_index);
			if (ret)
				return DROP(skb, skb->len, ret, METRIC_DIR_INGRESS, &fi, ifindex, TC_ACT_SHOT);
		}
	} else if (ct_state == CT_NEW || ct_state == CT_REOPENED) {
		src_id = ipcache_identity(p.saddr, NULL);
		fi.src_label = src_id;
		if (ep_flags & EP_F_POLICY_INGRESS) {
			ret = policy_can_access(ep_id, src_id, POLICY_INGRESS, &p);
			policy_verdict(skb, &fi, ret, 0, ifindex);
			if (ret)
				return DROP(skb, skb->len, ret, METRIC_DIR_INGRESS, &fi, ifindex, TC_ACT_SHOT);
		}
		if (ct_state == CT_NEW) {
			ret = ct_create4(&p, CT_DIR_IN, 0, 0, src_id, 0, ifindex);
			if (ret)
				return DROP(skb, skb->len, ret, METRIC_DIR_INGRESS, &fi, ifindex, TC_ACT_SHOT);
		} else if (ct) {
			ct->src_sec_id = src_id;
		}
	}
	update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_INGRESS);
	trace(skb, TRACE_TO_LXC, &fi, ct_state, ifindex);
	return TC_ACT_OK;
}
