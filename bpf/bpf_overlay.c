/* SPDX-License-Identifier: Apache-2.0 */
/* Programs on the VXLAN device of tunnel routing mode (a collect-metadata device, one per node).
 *
 * Routes to other nodes' pod CIDRs point into the device (via a link-local gateway with a permanent
 * neighbour entry), so whatever the stack or a FIB redirect sends to a remote pod reaches:
 *
 *   to_overlay (TC egress): the ipcache names the node the destination lives on; the packet gets
 *     that node as tunnel destination, the source's security identity as VNI, and the receiving
 *     device's MAC (derived from its node IP, see tunnel_mac) as inner destination, so the far side
 *     takes it as addressed to itself. No tunnel endpoint: dropped and counted.
 *   from_overlay (TC ingress): decapsulated packets are accepted only from nodes of the cluster
 *     (outer source is a remote-node address in the ipcache) and only for this node's endpoints or
 *     the node itself; then the stack routes them to the pod, whose to_container enforces policy.
 */
#define THIS_FILE FILE_OVERLAY
#include "common.h"
#include "events.h"
#include "policy.h"

#define TUNNEL_TTL 64

/* The MAC of a node's VXLAN device: TUNNEL_MAC_0:TUNNEL_MAC_1 and the node's IPv4 address. Every
 * node derives the peer's from the tunnel endpoint, so no neighbour state is exchanged. */
static __always_inline void tunnel_mac(__u8 *mac, __be32 node_ip)
{
	const __u8 *b = (const __u8 *)&node_ip;

	mac[0] = TUNNEL_MAC_0;
	mac[1] = TUNNEL_MAC_1;
	mac[2] = b[0];
	mac[3] = b[1];
	mac[4] = b[2];
	mac[5] = b[3];
}

static __always_inline int overlay_ip4(struct __sk_buff *skb, struct ethhdr **eth, struct iphdr **ip4)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;

	*eth = data;
	*ip4 = (void *)(*eth + 1);
	if ((void *)(*ip4 + 1) > data_end)
		return 0;
	return (*eth)->h_proto == bpf_htons(ETH_P_IP);
}

int to_overlay(struct __sk_buff *skb)
{
	struct remote_endpoint_info *dst_info = NULL;
	struct endpoint_info *src_ep;
	struct endpoint_key ek = {};
	struct bpf_tunnel_key key = {};
	struct flow_info fi = {};
	struct ethhdr *eth;
	struct iphdr *ip4;

	if (!overlay_ip4(skb, &eth, &ip4))
		return TC_ACT_OK; /* ARP and the like never need the tunnel: routes use a static neighbour */
	fi.saddr = ip4->saddr;
	fi.daddr = ip4->daddr;
	fi.proto = ip4->protocol;
	fi.dst_label = ipcache_identity(ip4->daddr, &dst_info);
	ek.ip = ip4->saddr;
	src_ep = map_lookup(endpoints, &ek); /* a local pod: its identity without an LPM lookup */
	fi.src_label = src_ep ? src_ep->sec_id : ipcache_identity(ip4->saddr, NULL);
	if (!dst_info || !dst_info->tunnel_endpoint || dst_info->tunnel_endpoint == NODE_IP)
		return DROP(skb, skb->len, DROP_NO_TUNNEL_ENDPOINT, METRIC_DIR_EGRESS, &fi, skb->ifindex,
			    TC_ACT_SHOT);

	tunnel_mac(eth->h_dest, dst_info->tunnel_endpoint);
	key.remote_ipv4 = bpf_ntohl(dst_info->tunnel_endpoint);
	key.tunnel_id = fi.src_label;
	key.tunnel_ttl = TUNNEL_TTL;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return DROP(skb, skb->len, DROP_WRITE_ERROR, METRIC_DIR_EGRESS, &fi, skb->ifindex, TC_ACT_SHOT);
	update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_OVERLAY_TX);
	return TC_ACT_OK;
}

int from_overlay(struct __sk_buff *skb)
{
	struct remote_endpoint_info *src_node = NULL;
	struct bpf_tunnel_key key = {};
	struct flow_info fi = {};
	struct ethhdr *eth;
	struct iphdr *ip4;
	struct endpoint_key ek = {};
	__be32 outer_src;

	if (!overlay_ip4(skb, &eth, &ip4))
		return DROP(skb, skb->len, DROP_UNKNOWN_L3, METRIC_DIR_OVERLAY_RX, NULL, skb->ifindex,
			    TC_ACT_SHOT);
	fi.saddr = ip4->saddr;
	fi.daddr = ip4->daddr;
	fi.proto = ip4->protocol;
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return DROP(skb, skb->len, DROP_INVALID, METRIC_DIR_OVERLAY_RX, &fi, skb->ifindex, TC_ACT_SHOT);
	fi.src_label = (__u32)key.tunnel_id;
	outer_src = bpf_htonl(key.remote_ipv4);
	ipcache_identity(outer_src, &src_node);
	if (!src_node || !(src_node->flags & IPCACHE_F_REMOTE_NODE) || src_node->sec_identity != ID_REMOTE_NODE)
		return DROP(skb, skb->len, DROP_UNKNOWN_TUNNEL_PEER, METRIC_DIR_OVERLAY_RX, &fi, skb->ifindex,
			    TC_ACT_SHOT);
	ek.ip = ip4->daddr;
	if (!map_lookup(endpoints, &ek) && ipcache_identity(ip4->daddr, NULL) != ID_HOST)
		return DROP(skb, skb->len, DROP_UNROUTABLE, METRIC_DIR_OVERLAY_RX, &fi, skb->ifindex, TC_ACT_SHOT);
	update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_OVERLAY_RX);
	return TC_ACT_OK;
}
