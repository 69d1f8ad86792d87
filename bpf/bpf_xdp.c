/* SPDX-License-Identifier: Apache-2.0 */
/* XDP on the node's external device: CIDR prefilter. Packets whose IPv4 source falls in a prefix of
 * prefilter_v4 are dropped (and counted) before the stack allocates anything for them. */
#define THIS_FILE FILE_XDP
#include "common.h"
#include "events.h"

int xdp_prefilter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4;
	struct ipcache_key key = {};
	struct flow_info fi = {};

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip4 = (void *)(eth + 1);
	if ((void *)(ip4 + 1) > data_end)
		return XDP_PASS;

	key.prefixlen = 32;
	key.addr = ip4->saddr;
	if (map_lookup(prefilter_v4, &key)) {
		fi.saddr = ip4->saddr;
		fi.daddr = ip4->daddr;
		fi.proto = ip4->protocol;
		fi.src_label = ID_WORLD;
		return DROP(ctx, (__u32)(data_end - data), DROP_PREFILTER, METRIC_DIR_INGRESS, &fi,
			    ctx->ingress_ifindex, XDP_DROP);
	}
	return XDP_PASS;
}
