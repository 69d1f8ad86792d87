/* SPDX-License-Identifier: Apache-2.0 */
/* Programs on the node's external device.
 *
 *   from_netdev (TC ingress): reverse SNAT of replies to masqueraded and NodePort-SNATed flows;
 *     NodePort / ExternalIP / LoadBalancer-IP frontends: backend selection and DNAT, delivery to a
 *     local backend by redirect, or SNAT to the node IP and a FIB redirect to a remote backend so
 *     its replies come back through this node (externalTrafficPolicy=Local: local backends only,
 *     client source IP kept).
 *   to_netdev (TC egress): reverse DNAT of replies from local NodePort backends; masquerade of pod
 *     traffic leaving the cluster (BPF SNAT to the node IP). */
#define THIS_FILE FILE_HOST
#include "common.h"
#include "events.h"
#include "csum.h"
#include "conntrack.h"
#include "lb.h"
#include "policy.h"
#include "nat.h"
#include "icmp_reject.h"

/* Pod CIDR of this node (masquerade sources) and the native-routing CIDR (never masqueraded). */
#ifndef POD_CIDR_ADDR
#define POD_CIDR_ADDR 0
#define POD_CIDR_MASK 0xffffffff
#endif
#ifndef CLUSTER_CIDR_ADDR
#define CLUSTER_CIDR_ADDR 0
#define CLUSTER_CIDR_MASK 0xffffffff
#endif
#ifndef AF_INET
#define AF_INET 2
#endif

/* The kernel's signature (bcc 0.26 declares an older, shorter one). */
static long (*redirect_neigh4)(__u32 ifindex, void *params, int plen, __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

#define FRONTEND_FLAGS (SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL_IP | SVC_FLAG_LOADBALANCER)

static __always_inline int in_cidr(__be32 addr, __be32 net, __be32 mask)
{
	return (addr & mask) == net;
}

/* Send the packet out of the device the FIB chooses for its destination (bypassing the stack, which
 * would refuse a packet carrying one of its own addresses as source). */
static __always_inline int fib_redirect(struct __sk_buff *skb, const struct pkt4 *p)
{
	struct bpf_fib_lookup fib = {};
	int ret;

	fib.family = AF_INET;
	fib.l4_protocol = p->proto;
	fib.tot_len = skb->len - ETH_HLEN;
	fib.ipv4_src = p->saddr;
	fib.ipv4_dst = p->daddr;
	fib.ifindex = skb->ifindex;
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_DIRECT);
	if (ret == BPF_FIB_LKUP_RET_SUCCESS) {
		if (set_macs(skb, fib.smac, fib.dmac))
			return -DROP_WRITE_ERROR;
		return bpf_redirect(fib.ifindex, 0);
	}
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH)
		return redirect_neigh4(fib.ifindex, NULL, 0, 0);
	return -DROP_NO_FIB;
}

static __always_inline int rev_nat_to_frontend(struct __sk_buff *skb, struct pkt4 *p, __u16 rev_nat_index)
{
	struct lb4_reverse_nat_key k = {};
	struct lb4_reverse_nat *rn;

	k.rev_nat_index = rev_nat_index;
	rn = map_lookup(lb4_reverse_nat, &k);
	if (!rn)
		return 0;
	return rewrite_addr_port(skb, p, 1, rn->address ? rn->address : NODE_IP, rn->port);
}

static __always_inline struct ct_entry *nodeport_ct_lookup(const struct pkt4 *reply)
{
	return ct_get(reply, 1, CT_DIR_NODEPORT);
}

int from_netdev(struct __sk_buff *skb)
{
	struct pkt4 p = {};
	struct flow_info fi = {};
	struct lb4_service *svc = NULL;
	__u32 ifindex = skb->ifindex;
	__be32 fe_addr;
	int ret, err = 0;

	ret = parse_ipv4(skb, &p);
	if (ret < 0)
		return TC_ACT_OK;
	pkt_flow_info(&p, &fi);
	fi.src_label = ID_WORLD;
	if (ret > 0)
		return DROP(skb, skb->len, ret, METRIC_DIR_INGRESS, &fi, ifindex, TC_ACT_SHOT);
	if (p.is_fragment)
		return TC_ACT_OK;

	/* 1. Replies to flows we source-NATed. */
	if (NODE_IP && p.daddr == NODE_IP && snat_v4_rev(skb, &p, &err)) {
		struct ct_entry *np;

		if (err)
			return DROP(skb, skb->len, err, METRIC_DIR_INGRESS, &fi, ifindex, TC_ACT_SHOT);
		np = nodeport_ct_lookup(&p);
		if (!np) {
			update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_INGRESS);
			return TC_ACT_OK; /* masquerade reply: the stack routes it to the pod */
		}
		/* reply from a remote NodePort backend: restore the frontend, send it to the client */
		ct_refresh(np, &p, 1);
		ret = rev_nat_to_frontend(skb, &p, np->rev_nat_index);
		if (ret)
			return DROP(skb, skb->len, ret, METRIC_DIR_INGRESS, &fi, ifindex, TC_ACT_SHOT);
		update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_INGRESS);
		ret = fib_redirect(skb, &p);
		return ret < 0 ? DROP(skb, skb->len, -ret, METRIC_DIR_INGRESS, &fi, ifindex, TC_ACT_SHOT) : ret;
	}

	/* 2. North-south frontends. */
	if (!has_ports(p.proto))
		return TC_ACT_OK;
	fe_addr = p.daddr;
	svc = lb4_lookup_service(p.daddr, p.dport, p.proto);
	if (svc && !(svc->flags & FRONTEND_FLAGS))
		svc = NULL; /* a ClusterIP is not reachable from outside */
	if (!svc && NODE_IP && p.daddr == NODE_IP) {
		__u16 port = bpf_ntohs(p.dport);
		if (port >= NODEPORT_MIN && port <= NODEPORT_MAX) {
			fe_addr = 0;
			svc = lb4_lookup_service(0, p.dport, p.proto);
		}
	}
	if (!svc)
		return TC_ACT_OK;
	{
		struct lb4_result lb = {};
		struct endpoint_key ek = {};
		struct endpoint_info *ep;
		__be32 baddr;
		__be16 bport;
		__u16 rev_nat;
		int local_scope = svc->flags & SVC_FLAG_EXT_LOCAL_SCOPE;
		int host_backend;

		ret = lb4_local(&p, fe_addr, svc, 1, &lb);
		if (ret == DROP_NO_SERVICE)
			return lb4_reject_no_backend(skb, &p, &fi, ifindex, 0);
		if (ret)
			return DROP(skb, skb->len, ret, METRIC_DIR_SERVICE, &fi, ifindex, TC_ACT_SHOT);
		baddr = lb.backend->address;
		bport = lb.backend->port;
		rev_nat = lb.rev_nat_index;
		ret = rewrite_addr_port(skb, &p, 0, baddr, bport);
		if (ret)
			return DROP(skb, skb->len, ret, METRIC_DIR_SERVICE, &fi, ifindex, TC_ACT_SHOT);
		ek.ip = baddr;
		ep = map_lookup(endpoints, &ek);
		/* remember the translated tuple so replies get the frontend back. A backend that is not a
		 * local pod is either remote (SNAT + FIB redirect: CT_F_HOST_NAT) or a hostNetwork backend
		 * at this node's own address, which the stack delivers (replies pass to_netdev); that is
		 * decided once per connection, from the ipcache, and kept in the entry's flags. */
		{
			struct ct_entry *e = ct_get(&p, 0, CT_DIR_NODEPORT);
			if (e) {
				ct_refresh(e, &p, 0);
				e->rev_nat_index = rev_nat;
				host_backend = !ep && !(e->flags & CT_F_HOST_NAT);
			} else {
				host_backend = !ep && ipcache_identity(baddr, NULL) == ID_HOST;
				if (!ep && !host_backend && local_scope)
					return DROP(skb, skb->len, DROP_NO_LOCAL_BACKEND, METRIC_DIR_SERVICE, &fi, ifindex,
						    TC_ACT_SHOT);
				ret = ct_create4(&p, CT_DIR_NODEPORT, rev_nat, lb.backend_id, ID_WORLD,
						 CT_F_NODE_PORT | (ep || host_backend ? 0 : CT_F_HOST_NAT), ifindex);
				if (ret)
					return DROP(skb, skb->len, ret, METRIC_DIR_SERVICE, &fi, ifindex, TC_ACT_SHOT);
			}
		}
		update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_SERVICE);
		if (ep) {
			__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
			__u32 ep_ifindex = ep->ifindex;
			__builtin_memcpy(smac, ep->node_mac, ETH_ALEN);
			__builtin_memcpy(dmac, ep->mac, ETH_ALEN);
			if (set_macs(skb, smac, dmac))
				return DROP(skb, skb->len, DROP_WRITE_ERROR, METRIC_DIR_SERVICE, &fi, ifindex, TC_ACT_SHOT);
			return bpf_redirect(ep_ifindex, 0);
		}
		if (host_backend)
			return TC_ACT_OK;
		/* remote backend: SNAT to the node so the reply returns here, then forward */
		ret = snat_v4(skb, &p, NODE_IP);
		if (ret)
			return DROP(skb, skb->len, ret, METRIC_DIR_SERVICE, &fi, ifindex, TC_ACT_SHOT);
		ret = fib_redirect(skb, &p);
		return ret < 0 ? DROP(skb, skb->len, -ret, METRIC_DIR_SERVICE, &fi, ifindex, TC_ACT_SHOT) : ret;
	}
}

int to_netdev(struct __sk_buff *skb)
{
	struct pkt4 p = {};
	struct flow_info fi = {};
	struct ct_entry *np;
	__u32 ifindex = skb->ifindex;
	int ret;

	ret = parse_ipv4(skb, &p);
	if (ret < 0)
		return TC_ACT_OK;
	pkt_flow_info(&p, &fi);
	if (ret > 0)
		return DROP(skb, skb->len, ret, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT);
	if (p.is_fragment)
		return TC_ACT_OK;

	/* 1. Reply of a local NodePort backend: restore the frontend address. */
	np = nodeport_ct_lookup(&p);
	if (np) {
		ct_refresh(np, &p, 1);
		ret = rev_nat_to_frontend(skb, &p, np->rev_nat_index);
		if (ret)
			return DROP(skb, skb->len, ret, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT);
		update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_EGRESS);
		return TC_ACT_OK;
	}

#ifdef ENABLE_MASQUERADE
	/* 2. Masquerade pod traffic leaving the cluster. */
	if (NODE_IP && in_cidr(p.saddr, POD_CIDR_ADDR, POD_CIDR_MASK) &&
	    !in_cidr(p.daddr, CLUSTER_CIDR_ADDR, CLUSTER_CIDR_MASK) &&
	    (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP ||
	     (p.proto == IPPROTO_ICMP && p.icmp_type == ICMP_ECHO))) {
		__u32 dst_id = ipcache_identity(p.daddr, NULL);
		if (dst_id != ID_HOST && dst_id != ID_REMOTE_NODE) {
			ret = snat_v4(skb, &p, NODE_IP);
			if (ret)
				return DROP(skb, skb->len, ret, METRIC_DIR_EGRESS, &fi, ifindex, TC_ACT_SHOT);
		}
	}
#endif
	update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_EGRESS);
	return TC_ACT_OK;
}
