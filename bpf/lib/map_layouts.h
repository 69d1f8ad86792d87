/* SPDX-License-Identifier: Apache-2.0 */
/* The one definition of every BPF map key/value layout and of the numeric codes shared with user
 * space (drop reasons, flags, event types). The Python mirror lives in bpf/maps/; a test compiles
 * this header and checks every size and offset against the mirror.
 *
 * Conventions: addresses and ports in network byte order; no bitfields (user space must be able to
 * mirror every field with ctypes); explicit padding so layouts are the same with and without packing.
 */
#ifndef PYCILIUM_MAP_LAYOUTS_H
#define PYCILIUM_MAP_LAYOUTS_H

#include <linux/types.h>

/* ---- load balancer --------------------------------------------------------------------------- */
/* How the agent writes a service (one rev_nat_index per frontend VIP:port/proto):
 *  1. backends: lb4_backends[id] = {addr, port, proto, state} for every backend, terminating ones too;
 *  2. slots: lb4_services[{vip, port, slot=1..count, proto}] = {backend_id}, node-local backends first;
 *  3. lb4_reverse_nat[rev_nat_index] = {vip, port}; lb_affinity_match[{backend_id, rev_nat_index}] = 1;
 *  4. last, the frontend: lb4_services[{vip, port, slot=0, proto}] = {count, local_count,
 *     rev_nat_index, flags, flags2, backend_id = affinity timeout in seconds when SVC_FLAG_AFFINITY}.
 *  count = active (non-terminating) backends; when none is active, terminating ones may fill the
 *  slots. count 0 = no backends: the datapath rejects (TCP RST / ICMP port unreachable).
 *  externalTrafficPolicy=Local (SVC_FLAG_EXT_LOCAL_SCOPE): north-south traffic uses slots
 *  1..local_count only; internalTrafficPolicy=Local (SVC_FLAG2_INT_LOCAL_SCOPE): east-west likewise.
 *  NodePort frontends use address 0 (any node address) with SVC_FLAG_NODEPORT; LoadBalancer ingress
 *  IPs and externalIPs their own address with SVC_FLAG_LOADBALANCER / SVC_FLAG_EXTERNAL_IP.
 *  Removal runs in reverse: frontend first, then slots beyond the new count, then unused backends. */

#define LB_SCOPE_EXT 0 /* north-south, and east-west unless the service has two scopes */
#define LB_SCOPE_INT 1 /* reserved (Cilium's two-scope layout): traffic policies use local_count */

/* lb4_service.flags */
#define SVC_FLAG_EXTERNAL_IP 0x01
#define SVC_FLAG_NODEPORT 0x02
#define SVC_FLAG_EXT_LOCAL_SCOPE 0x04 /* externalTrafficPolicy=Local */
#define SVC_FLAG_HOSTPORT 0x08
#define SVC_FLAG_AFFINITY 0x10
#define SVC_FLAG_LOADBALANCER 0x20
#define SVC_FLAG_ROUTABLE 0x40 /* reachable from outside the cluster (not a ClusterIP) */
#define SVC_FLAG_CLUSTERIP 0x80
/* lb4_service.flags2 */
#define SVC_FLAG2_INT_LOCAL_SCOPE 0x01 /* internalTrafficPolicy=Local */
#define SVC_FLAG2_TWO_SCOPES 0x02 /* reserved, see LB_SCOPE_INT; only decoded by the CLI */
#define SVC_FLAG2_MAGLEV 0x04

/* lb4_backend.flags: backend state */
#define BE_STATE_ACTIVE 0
#define BE_STATE_TERMINATING 1
#define BE_STATE_QUARANTINED 2
#define BE_STATE_MAINTENANCE 3

struct lb4_key {
	__be32 address;     /* service VIP / node IP / external IP */
	__be16 dport;       /* service port */
	__u16 backend_slot; /* 0: the service entry, 1..count: backend slots */
	__u8 proto;         /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 scope;         /* LB_SCOPE_* */
	__u8 pad[2];
};

struct lb4_service {
	__u32 backend_id;      /* slots > 0: backend id; slot 0: session affinity timeout (s) */
	__u16 count;           /* slot 0: number of active backend slots */
	__u16 rev_nat_index;   /* service id; key of the reverse-NAT map */
	__u8 flags;            /* SVC_FLAG_* */
	__u8 flags2;           /* SVC_FLAG2_* */
	__u16 local_count;     /* slot 0: how many of the slots hold node-local backends (first) */
};

struct lb4_backend_key {
	__u32 backend_id;
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags; /* BE_STATE_* */
	__u32 node_ip; /* node the backend runs on (0: unknown); for tunnel mode */
};

struct lb4_reverse_nat_key {
	__u16 rev_nat_index;
};

struct lb4_reverse_nat {
	__be32 address;
	__be16 port;
	__u16 pad;
};

struct lb4_affinity_key {
	__be32 client_ip;
	__u16 rev_nat_index;
	__u16 pad;
};

struct lb_affinity_val {
	__u64 last_used; /* monotonic seconds */
	__u32 backend_id;
	__u32 pad;
};

/* The backend an affinity entry points to must still belong to the service. */
struct lb_affinity_match {
	__u32 backend_id;
	__u16 rev_nat_index;
	__u16 pad;
};

/* Maglev consistent hashing (north-south frontends with SVC_FLAG2_MAGLEV): a lookup table of
 * LB_MAGLEV_TABLE_SIZE (a prime, node setting) backend ids per service, stored in chunks of
 * LB_MAGLEV_CHUNK so the layout does not depend on the table size:
 * lb4_maglev[{rev_nat_index, chunk}] = ids[chunk * 64 .. chunk * 64 + 63]. The agent builds the table
 * from the backends' addresses, so every node picks the same backend for a flow. */
#define LB_MAGLEV_CHUNK 64
struct lb4_maglev_key {
	__u16 rev_nat_index;
	__u16 chunk;
};
struct lb4_maglev_chunk {
	__u32 backend_ids[LB_MAGLEV_CHUNK];
};

/* Socket load-balancing (bpf_sock.c): UDP replies from a backend are shown to the application as
 * coming from the service address. Key: socket cookie + backend; value: the frontend. */
struct lb4_reverse_sk_key {
	__u64 cookie;
	__be32 address;
	__be16 port;
	__u16 pad;
};
struct lb4_reverse_sk {
	__be32 address;
	__be16 port;
	__u16 rev_nat_index;
};

/* ---- conntrack and NAT ------------------------------------------------------------------------ */

/* ct4_key.flags: which side created the entry */
#define CT_DIR_OUT 0      /* created by a packet leaving an endpoint (egress) */
#define CT_DIR_IN 1       /* created by a packet entering an endpoint (ingress) */
#define CT_DIR_SVC 4      /* service scope: tuple before DNAT, value holds the backend */
#define CT_DIR_NODEPORT 8 /* host program: NodePort/external tuple after DNAT, for replies */

/* ct_entry.flags (bit positions follow Cilium's ct_entry) */
#define CT_F_RX_CLOSING 0x0001
#define CT_F_TX_CLOSING 0x0002
#define CT_F_LB_LOOPBACK 0x0008
#define CT_F_SEEN_NON_SYN 0x0010
#define CT_F_NODE_PORT 0x0020
#define CT_F_HOST_NAT 0x0040 /* flow SNATed by the host program (masquerade or NodePort) */
#define CT_F_FROM_TUNNEL 0x0400

/* Tuples are stored in the order of the packet that created the entry. */
struct ct4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport; /* ICMP echo: identifier */
	__be16 dport; /* ICMP echo: 0 */
	__u8 nexthdr;
	__u8 flags; /* CT_DIR_* */
	__u8 pad[2];
};

struct ct_entry {
	__u32 backend_id;   /* service-scope entries: chosen backend */
	__u32 src_sec_id;   /* identity of the peer that opened the connection */
	__u64 packets;
	__u64 bytes;
	__u32 lifetime;     /* expiry, monotonic seconds */
	__u16 flags;        /* CT_F_* */
	__u16 rev_nat_index;/* service to restore on replies (0: none) */
	__u16 ifindex;
	__u8 tx_flags_seen; /* TCP flags seen in the original direction */
	__u8 rx_flags_seen; /* TCP flags seen in the reply direction */
	__u32 last_tx_report;
	__u32 last_rx_report;
	__u32 reserved;
};

/* snat_v4_external: both directions of every masqueraded / NodePort-SNATed flow. */
struct nat4_entry {
	__u64 created;  /* monotonic seconds */
	__be32 to_addr; /* OUT: new source address; IN: original (pre-SNAT) destination */
	__be16 to_port;
	__u8 needs_ct;
	__u8 pad;
};

/* ---- identity, ipcache, endpoints, policy ------------------------------------------------------ */

/* Reserved security identities. */
#define ID_UNKNOWN 0
#define ID_HOST 1
#define ID_WORLD 2
#define ID_UNMANAGED 3
#define ID_HEALTH 4
#define ID_INIT 5
#define ID_REMOTE_NODE 6
#define ID_KUBE_APISERVER 7

/* ipcache: every pod IP /32 -> {identity, tunnel_endpoint = IP of the node it runs on (0 if local)};
 * node IPs /32 -> ID_HOST (this node) or ID_REMOTE_NODE; CIDR identities for NetworkPolicy ipBlocks;
 * 0.0.0.0/0 -> ID_WORLD. */
#define IPCACHE_STATIC_PREFIX 0
struct ipcache_key {
	__u32 prefixlen; /* LPM prefix length over `addr` */
	__be32 addr;
};

#define IPCACHE_F_REMOTE_NODE 0x01 /* the IP lives on another node */

/* Tunnel routing mode: VXLAN in collect-metadata mode, VNI = the source's security identity. A
 * node's VXLAN device has the MAC TUNNEL_MAC_0:TUNNEL_MAC_1:<node IPv4>, set by the agent and
 * derived by bpf_overlay.c for the inner destination. */
#define TUNNEL_PORT 8472
#define TUNNEL_MAC_0 0x0a
#define TUNNEL_MAC_1 0x70
struct remote_endpoint_info {
	__u32 sec_identity;
	__be32 tunnel_endpoint; /* node IP the address lives on (0: this node / outside) */
	__u16 node_id;
	__u8 flags;
	__u8 pad;
};

#define EP_F_HOST 0x0001
#define EP_F_POLICY_INGRESS 0x0002 /* ingress policy is enforced for this endpoint */
#define EP_F_POLICY_EGRESS 0x0004  /* egress policy is enforced for this endpoint */
#define EP_F_NO_MAC_CHECK 0x0008

struct endpoint_key {
	__be32 ip;
};

struct endpoint_info {
	__u32 ifindex;     /* host-side veth */
	__u16 lxc_id;      /* endpoint id */
	__u16 flags;       /* EP_F_* */
	__u8 mac[6];       /* pod-side MAC */
	__u8 pad1[2];
	__u8 node_mac[6];  /* host-side veth MAC (the pod's gateway) */
	__u8 pad2[2];
	__u32 sec_id;      /* security identity */
	__u32 pad3;
};

/* policy: per endpoint (ep_id = endpoint_info.lxc_id) and direction. The datapath looks up
 * {remote identity, ep, dir, proto, port} and then {identity 0 (any), ...}, each by longest prefix;
 * a POLICY_F_DENY entry in either result drops, otherwise any match allows. An endpoint enforces a
 * direction only when its EP_F_POLICY_INGRESS / EP_F_POLICY_EGRESS flag is set (else allow all).
 * Port ranges (endPort) are written as several prefix entries. Replies of allowed connections pass
 * without a lookup (conntrack). */
#define POLICY_INGRESS 0
#define POLICY_EGRESS 1
/* LPM prefix of policy_key: sec_label, ep_id and egress are static (56 bits), then 8 bits of
 * protocol, then up to 16 bits of destination port. Protocol is only wildcarded with the port. */
#define POLICY_STATIC_PREFIX 56
#define POLICY_FULL_PREFIX 80
struct policy_key {
	__u32 prefixlen;
	__u32 sec_label; /* remote identity, 0 = any */
	__u16 ep_id;
	__u8 egress;
	__u8 protocol;   /* 0 = any */
	__be16 dport;    /* 0 with prefix <= 64 = any */
	__u16 pad;
};

#define POLICY_F_DENY 0x01
struct policy_entry {
	__u8 flags; /* POLICY_F_* */
	__u8 auth_type;
	__be16 proxy_port;
	__u32 pad;
	__u64 packets;
	__u64 bytes;
};

/* XDP CIDR prefilter: source prefixes dropped at the earliest point. Key: struct ipcache_key. */
struct prefilter_value {
	__u32 flags;
};

/* ---- metrics and events ---------------------------------------------------------------------- */

#define METRIC_DIR_INGRESS 1
#define METRIC_DIR_EGRESS 2
#define METRIC_DIR_SERVICE 3
#define METRIC_DIR_CT_TCP 4 /* REASON_CT_CREATED: entries created in ct4_global */
#define METRIC_DIR_CT_ANY 5 /* REASON_CT_CREATED: entries created in ct_any4_global */
#define METRIC_DIR_OVERLAY_TX 6 /* into the VXLAN tunnel (tunnel routing mode) */
#define METRIC_DIR_OVERLAY_RX 7 /* out of the VXLAN tunnel */

/* The metrics map is a per-CPU array: the key, read as a little-endian u32, is the index
 * reason | dir << 8 (2048 slots), so counting a packet is one array access. */
#define METRICS_SLOTS 2048
struct metrics_key {
	__u8 reason; /* 0: forwarded, else a DROP_* code */
	__u8 dir;    /* METRIC_DIR_* (0..7) */
	__u16 pad;
};

struct metrics_value {
	__u64 count;
	__u64 bytes;
};

/* Drop reasons (Cilium's numbering where the concept is the same). */
#define REASON_FORWARDED 0
#define DROP_INVALID_SMAC 130
#define DROP_INVALID_DMAC 131
#define DROP_INVALID_SIP 132
#define DROP_POLICY 133
#define DROP_INVALID 134
#define DROP_CT_INVALID_HDR 135
#define DROP_CT_UNKNOWN_PROTO 137
#define DROP_UNKNOWN_L3 139
#define DROP_WRITE_ERROR 141
#define DROP_UNKNOWN_L4 142
#define DROP_UNKNOWN_ICMP_TYPE 144
#define DROP_UNROUTABLE 151
#define DROP_CSUM_L3 153
#define DROP_CT_CREATE_FAILED 155
#define DROP_FRAG_NOSUPPORT 157
#define DROP_NO_SERVICE 158
#define DROP_NO_TUNNEL_ENDPOINT 160
#define DROP_NAT_NO_MAPPING 167
#define DROP_NAT_UNSUPP_PROTO 168
#define DROP_NO_FIB 169
#define DROP_POLICY_DENY 181
#define DROP_PREFILTER 220       /* CIDR prefilter (XDP) */
#define DROP_NO_LOCAL_BACKEND 221/* traffic-policy Local with no local backend */
#define DROP_INVALID_SVC_SLOT 222/* a service slot points to a missing backend */
#define DROP_UNKNOWN_TUNNEL_PEER 223/* VXLAN packet from an address that is not a cluster node */
#define REASON_POLICY_ALLOWED 250/* policy verdicts that allowed a new connection */
#define REASON_CT_CREATED 251    /* conntrack entries created (GC derives LRU evictions from it) */

#define EVENT_DROP 1
#define EVENT_TRACE 4
#define EVENT_POLICY_VERDICT 5

/* trace observation points */
#define TRACE_FROM_LXC 1
#define TRACE_TO_LXC 2
#define TRACE_FROM_NETDEV 3
#define TRACE_TO_NETDEV 4
#define TRACE_TO_STACK 5

/* conntrack states reported in events */
#define CT_NEW 0
#define CT_ESTABLISHED 1
#define CT_REPLY 2
#define CT_RELATED 3
#define CT_REOPENED 4

struct monitor_event {
	__u8 type;      /* EVENT_* */
	__u8 subtype;   /* drop reason, trace point, or verdict (REASON_POLICY_ALLOWED / DROP_*) */
	__u16 source;   /* endpoint id */
	__u32 ifindex;
	__u32 src_label;
	__u32 dst_label;
	__u32 orig_len;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u8 ct_state;  /* CT_* */
	__u8 egress;    /* policy verdict direction */
	__u16 line;     /* source line of the drop */
	__u8 file;      /* source file id */
	__u8 pad;
	__u64 ktime_ns;
};

#endif /* PYCILIUM_MAP_LAYOUTS_H */
