/* SPDX-License-Identifier: Apache-2.0 */
/* Socket-level load-balancing for processes in the node's own network namespace (node daemons,
 * hostNetwork pods), attached to the cgroup v2 root:
 *
 *   sock4_connect (cgroup/connect4), sock4_sendmsg (cgroup/sendmsg4): a TCP/UDP socket addressed to
 *     a service frontend is pointed at a backend before any packet exists, so no NAT is needed;
 *     a service without backends fails connect() at once.
 *   sock4_recvmsg (cgroup/recvmsg4): replies of unconnected UDP sockets show the service address.
 *
 * The cgroup hooks see every socket of the machine; these programs act only on sockets of the
 * node's network namespace (NETNS_COOKIE). Pods are load-balanced by bpf_lxc.c on their veth. */
#define THIS_FILE FILE_SOCK
#include "common.h"
#include "lb.h"

#ifndef NETNS_COOKIE
#define NETNS_COOKIE 0
#endif

static __always_inline int own_netns(struct bpf_sock_addr *ctx)
{
	return !NETNS_COOKIE || bpf_get_netns_cookie(ctx) == NETNS_COOKIE;
}

/* 1: let the call proceed (translated or not); 0: refuse it (a service without backends). */
static __always_inline int sock4_xlate(struct bpf_sock_addr *ctx, int udp_reverse)
{
	__u8 proto = (__u8)ctx->protocol;
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	__be32 fe_addr = addr;
	struct lb4_service *svc;
	struct lb4_backend_key bk = {};
	struct lb4_backend *be;
	__u16 count;

	if ((proto != IPPROTO_TCP && proto != IPPROTO_UDP) || !own_netns(ctx))
		return 1;
	svc = lb4_lookup_service(addr, port, proto);
	if (!svc && NODE_IP && addr == NODE_IP && bpf_ntohs(port) >= NODEPORT_MIN && bpf_ntohs(port) <= NODEPORT_MAX) {
		fe_addr = 0;
		svc = lb4_lookup_service(0, port, proto);
	}
	if (!svc)
		return 1;
	count = lb4_usable_count(svc, 0);
	if (count == 0) {
		update_metrics(0, DROP_NO_SERVICE, METRIC_DIR_SERVICE);
		return 0;
	}
	bk.backend_id = lb4_select_backend(fe_addr, port, proto, count);
	be = bk.backend_id ? map_lookup(lb4_backends, &bk) : NULL;
	if (!be) {
		update_metrics(0, DROP_INVALID_SVC_SLOT, METRIC_DIR_SERVICE);
		return 0;
	}
	if (udp_reverse && proto == IPPROTO_UDP) {
		struct lb4_reverse_sk_key rk = {};
		struct lb4_reverse_sk rv = {};

		rk.cookie = bpf_get_socket_cookie(ctx);
		rk.address = be->address;
		rk.port = be->port;
		rv.address = addr;
		rv.port = port;
		rv.rev_nat_index = svc->rev_nat_index;
		map_update(lb4_reverse_sk, &rk, &rv, BPF_ANY);
	}
	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
	return 1;
}

int sock4_connect(struct bpf_sock_addr *ctx)
{
	return sock4_xlate(ctx, 1);
}

int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_xlate(ctx, 1);
}

int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	struct lb4_reverse_sk_key rk = {};
	struct lb4_reverse_sk *rv;

	if (!own_netns(ctx))
		return 1;
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.address = ctx->user_ip4;
	rk.port = (__be16)ctx->user_port;
	rv = map_lookup(lb4_reverse_sk, &rk);
	if (rv) {
		ctx->user_ip4 = rv->address;
		ctx->user_port = (__u32)rv->port;
	}
	return 1;
}
