/* SPDX-License-Identifier: Apache-2.0 */
/* Our own connection tracking in LRU hash maps (ct4_global: TCP, ct_any4_global: the rest).
 *
 * Entries are keyed by the tuple of the packet that created them plus the side that created
 * them: CT_DIR_OUT (egress from an endpoint), CT_DIR_IN (ingress to an endpoint), CT_DIR_SVC
 * (pre-DNAT service tuple, holds the chosen backend). An egress lookup tries {tuple, OUT}
 * (established) then {reversed tuple, IN} (reply); an ingress lookup the mirror image. */
#ifndef PYCILIUM_CONNTRACK_H
#define PYCILIUM_CONNTRACK_H

#include "parse.h"
#include "metrics.h"

#ifndef CT_LIFETIME_TCP
#define CT_LIFETIME_TCP 8000
#endif
#ifndef CT_LIFETIME_TCP_SYN
#define CT_LIFETIME_TCP_SYN 60
#endif
#ifndef CT_LIFETIME_TCP_FIN
#define CT_LIFETIME_TCP_FIN 10
#endif
#ifndef CT_LIFETIME_NONTCP
#define CT_LIFETIME_NONTCP 60
#endif

#define CT_EGRESS 0
#define CT_INGRESS 1

static __always_inline void *ct_map(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return MAP(ct4_global);
	return MAP(ct_any4_global);
}

/* The key of `p`'s tuple (or of the reply direction's) in scope `flags` (CT_DIR_*). */
static __always_inline void ct_key_of(const struct pkt4 *p, int reverse, __u8 flags, struct ct4_key *k)
{
	k->saddr = reverse ? p->daddr : p->saddr;
	k->daddr = reverse ? p->saddr : p->daddr;
	k->sport = reverse ? p->dport : p->sport;
	k->dport = reverse ? p->sport : p->dport;
	k->nexthdr = p->proto;
	k->flags = flags;
}

static __always_inline struct ct_entry *ct_get(const struct pkt4 *p, int reverse, __u8 flags)
{
	struct ct4_key k = {};

	ct_key_of(p, reverse, flags, &k);
	return bpf_map_lookup_elem(ct_map(p->proto), &k);
}

/* Refresh lifetime, flags and (with `count`) counters of an entry for a packet in one direction.
 * Fields are only written when they change, to keep the entry's cache line clean on the hot path. */
static __always_inline void ct_refresh_opt(struct ct_entry *e, const struct pkt4 *p, int reply, int count)
{
	__u32 now = p->now;
	__u32 lifetime = CT_LIFETIME_NONTCP;

	if (p->proto == IPPROTO_TCP) {
		__u8 fl = p->tcp_flags;
		__u16 f = e->flags;

		if (reply) {
			if ((e->rx_flags_seen | fl) != e->rx_flags_seen)
				e->rx_flags_seen |= fl;
		} else if ((e->tx_flags_seen | fl) != e->tx_flags_seen) {
			e->tx_flags_seen |= fl;
		}
		if (fl & TCP_FLAG_RST)
			f |= CT_F_RX_CLOSING | CT_F_TX_CLOSING;
		else if (fl & TCP_FLAG_FIN)
			f |= reply ? CT_F_RX_CLOSING : CT_F_TX_CLOSING;
		if (!(fl & TCP_FLAG_SYN) || (fl & TCP_FLAG_ACK))
			f |= CT_F_SEEN_NON_SYN;
		if (f != e->flags)
			e->flags = f;
		if ((f & (CT_F_RX_CLOSING | CT_F_TX_CLOSING)) == (CT_F_RX_CLOSING | CT_F_TX_CLOSING))
			lifetime = CT_LIFETIME_TCP_FIN;
		else if (!(f & CT_F_SEEN_NON_SYN))
			lifetime = CT_LIFETIME_TCP_SYN;
		else
			lifetime = CT_LIFETIME_TCP;
	}
	if (e->lifetime != now + lifetime)
		e->lifetime = now + lifetime;
	if (!count)
		return;
	if (reply) {
		if (e->last_rx_report != now)
			e->last_rx_report = now;
	} else if (e->last_tx_report != now) {
		e->last_tx_report = now;
	}
	/* statistics: plain increments (a lost update when two CPUs race is acceptable) */
	e->packets += 1;
	e->bytes += p->len;
}

#define ct_refresh(e, p, reply) ct_refresh_opt((e), (p), (reply), 1)

/* Look up the connection of `p` from the point of view of an endpoint's egress or ingress.
 * Returns the entry (or NULL for a new connection) and the state in *state. */
static __always_inline struct ct_entry *ct_lookup4(const struct pkt4 *p, int dir, __u8 *state)
{
	struct ct_entry *e = ct_get(p, 0, dir == CT_INGRESS ? CT_DIR_IN : CT_DIR_OUT);

	if (e) {
		/* A fresh SYN on a closed connection, or any packet on an expired entry, opens a new
		 * connection on the old tuple: the caller rechecks policy and overwrites the entry's
		 * service state (a reused source port must not inherit the old flow's reverse NAT). */
		if ((p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN &&
		     (e->flags & (CT_F_RX_CLOSING | CT_F_TX_CLOSING))) ||
		    (__s32)(e->lifetime - p->now) < 0) {
			e->flags = 0;
			e->rev_nat_index = 0;
			e->backend_id = 0;
			e->tx_flags_seen = 0;
			e->rx_flags_seen = 0;
			*state = CT_REOPENED;
		} else {
			*state = CT_ESTABLISHED;
		}
		ct_refresh(e, p, 0);
		return e;
	}
	e = ct_get(p, 1, dir == CT_INGRESS ? CT_DIR_OUT : CT_DIR_IN);
	if (e) {
		*state = CT_REPLY;
		ct_refresh(e, p, 1);
		return e;
	}
	*state = CT_NEW;
	return NULL;
}

/* Create the entry for a new connection; 0 or DROP_CT_CREATE_FAILED. */
static __always_inline int ct_create4(const struct pkt4 *p, __u8 key_flags, __u16 rev_nat_index, __u32 backend_id,
				      __u32 src_sec_id, __u16 entry_flags, __u32 ifindex)
{
	struct ct4_key k = {};
	struct ct_entry e = {};

	ct_key_of(p, 0, key_flags, &k);
	e.rev_nat_index = rev_nat_index;
	e.backend_id = backend_id;
	e.src_sec_id = src_sec_id;
	e.flags = entry_flags;
	e.ifindex = (__u16)ifindex;
	ct_refresh(&e, p, 0);
	if (bpf_map_update_elem(ct_map(p->proto), &k, &e, BPF_ANY) < 0)
		return DROP_CT_CREATE_FAILED;
	update_metrics(p->len, REASON_CT_CREATED, p->proto == IPPROTO_TCP ? METRIC_DIR_CT_TCP : METRIC_DIR_CT_ANY);
	return 0;
}

#endif /* PYCILIUM_CONNTRACK_H */
