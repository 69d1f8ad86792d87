/* SPDX-License-Identifier: Apache-2.0 */
/* Service load-balancing: frontend lookup, backend selection (random, session affinity), and the
 * service-scope conntrack entry that pins an established flow to its backend. */
#ifndef PYCILIUM_LB_H
#define PYCILIUM_LB_H

#include "conntrack.h"

static __always_inline struct lb4_service *lb4_lookup_service(__be32 addr, __be16 port, __u8 proto)
{
	struct lb4_key k = {};
	struct lb4_service *svc;

	k.address = addr;
	k.dport = port;
	k.proto = proto;
	svc = map_lookup(lb4_services, &k);
	return svc;
}

static __always_inline __u16 lb4_usable_count(const struct lb4_service *svc, int north_south)
{
	if (north_south ? (svc->flags & SVC_FLAG_EXT_LOCAL_SCOPE) : (svc->flags2 & SVC_FLAG2_INT_LOCAL_SCOPE))
		return svc->local_count;
	return svc->count;
}

static __always_inline __u32 lb4_slot_backend(__be32 addr, __be16 port, __u8 proto, __u16 slot)
{
	struct lb4_key k = {};
	struct lb4_service *s;

	k.address = addr;
	k.dport = port;
	k.proto = proto;
	k.backend_slot = slot;
	s = map_lookup(lb4_services, &k);
	return s ? s->backend_id : 0;
}

static __always_inline __u32 lb4_select_backend(__be32 addr, __be16 port, __u8 proto, __u16 count)
{
	__u16 slot = (__u16)(bpf_get_prandom_u32() % count) + 1;

	return lb4_slot_backend(addr, port, proto, slot);
}

#ifndef LB_MAGLEV_TABLE_SIZE
#define LB_MAGLEV_TABLE_SIZE 16381
#endif

/* A flow hash that is the same on every node (the Maglev table is too). */
static __always_inline __u32 lb4_flow_hash(const struct pkt4 *p)
{
	__u32 h = p->saddr * 0x9e3779b1u;

	h ^= p->daddr * 0x85ebca6bu;
	h ^= (((__u32)p->sport << 16) | p->dport) * 0xc2b2ae35u;
	h ^= p->proto;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 lb4_maglev_backend(const struct pkt4 *p, __u16 rev_nat_index)
{
	__u32 idx = lb4_flow_hash(p) % LB_MAGLEV_TABLE_SIZE;
	struct lb4_maglev_key k = {};
	struct lb4_maglev_chunk *c;

	k.rev_nat_index = rev_nat_index;
	k.chunk = (__u16)(idx / LB_MAGLEV_CHUNK);
	c = map_lookup(lb4_maglev, &k);
	return c ? c->backend_ids[idx & (LB_MAGLEV_CHUNK - 1)] : 0;
}

static __always_inline int lb4_affinity_valid(__u32 backend_id, __u16 rev_nat_index)
{
	struct lb_affinity_match m = {};

	m.backend_id = backend_id;
	m.rev_nat_index = rev_nat_index;
	return map_lookup(lb_affinity_match, &m) != NULL;
}

struct lb4_result {
	__u32 backend_id;
	__u16 rev_nat_index;
	struct lb4_backend *backend;
};

/* Choose the backend for `p` addressed to service `svc` (frontend addr/port as in the packet).
 * 0 with res filled, or a DROP_* reason. Reuses the service-scope CT entry of established flows:
 * an established flow keeps its backend while it exists (also while terminating); a new SYN to a
 * terminating or removed backend picks again. */
static __always_inline int lb4_local(const struct pkt4 *p, __be32 fe_addr, const struct lb4_service *svc,
				     int north_south, struct lb4_result *res)
{
	__u16 count = lb4_usable_count(svc, north_south);
	struct ct4_key k = {};
	struct ct_entry *e;
	struct lb4_backend_key bk = {};
	__u32 backend_id = 0;
	__u32 now = p->now;

	res->rev_nat_index = svc->rev_nat_index;
	k.saddr = p->saddr;
	k.daddr = fe_addr;
	k.sport = p->sport;
	k.dport = p->dport;
	k.nexthdr = p->proto;
	k.flags = CT_DIR_SVC;
	e = bpf_map_lookup_elem(ct_map(p->proto), &k);
	if (e) {
		int is_syn = p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
		bk.backend_id = e->backend_id;
		res->backend = map_lookup(lb4_backends, &bk);
		if (res->backend && (!is_syn || res->backend->flags == BE_STATE_ACTIVE)) {
			ct_refresh_opt(e, p, 0, 0); /* the egress entry counts the packets */
			res->backend_id = e->backend_id;
			return 0;
		}
	}
	if (count == 0)
		return north_south && svc->count ? DROP_NO_LOCAL_BACKEND : DROP_NO_SERVICE;

	if (svc->flags & SVC_FLAG_AFFINITY) {
		struct lb4_affinity_key ak = {};
		struct lb_affinity_val *av;

		ak.client_ip = p->saddr;
		ak.rev_nat_index = svc->rev_nat_index;
		av = map_lookup(lb4_affinity, &ak);
		if (av && now - (__u32)av->last_used <= svc->backend_id &&
		    lb4_affinity_valid(av->backend_id, svc->rev_nat_index)) {
			backend_id = av->backend_id;
			av->last_used = now;
		}
	}
	if (!backend_id && north_south && (svc->flags2 & SVC_FLAG2_MAGLEV))
		backend_id = lb4_maglev_backend(p, svc->rev_nat_index);
	if (!backend_id)
		backend_id = lb4_select_backend(fe_addr, p->dport, p->proto, count);
	if (!backend_id)
		return DROP_INVALID_SVC_SLOT;
	bk.backend_id = backend_id;
	res->backend = map_lookup(lb4_backends, &bk);
	if (!res->backend)
		return DROP_INVALID_SVC_SLOT;
	res->backend_id = backend_id;
	if (svc->flags & SVC_FLAG_AFFINITY) {
		struct lb4_affinity_key ak = {};
		struct lb_affinity_val av = {};

		ak.client_ip = p->saddr;
		ak.rev_nat_index = svc->rev_nat_index;
		av.last_used = now;
		av.backend_id = backend_id;
		map_update(lb4_affinity, &ak, &av, BPF_ANY);
	}
	if (e) {
		e->backend_id = backend_id;
		e->flags &= ~(CT_F_RX_CLOSING | CT_F_TX_CLOSING | CT_F_SEEN_NON_SYN);
		ct_refresh(e, p, 0);
		return 0;
	}
	{
		struct pkt4 svc_tuple = *p;
		svc_tuple.daddr = fe_addr;
		return ct_create4(&svc_tuple, CT_DIR_SVC, svc->rev_nat_index, backend_id, 0, 0, 0);
	}
}

#endif /* PYCILIUM_LB_H */
