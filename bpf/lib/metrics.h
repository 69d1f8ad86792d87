/* SPDX-License-Identifier: Apache-2.0 */
/* Per-CPU forward/drop counters by reason and direction. */
#ifndef PYCILIUM_METRICS_H
#define PYCILIUM_METRICS_H

#include "common.h"

static __always_inline void update_metrics(__u32 bytes, __u8 reason, __u8 dir)
{
	struct metrics_key key = {};
	struct metrics_value *v;

	key.reason = reason;
	key.dir = dir;
	v = map_lookup(metrics, &key);
	if (likely(v)) {
		v->count += 1; /* per-CPU slot: no atomics needed */
		v->bytes += bytes;
	} else {
		struct metrics_value init = {};
		init.count = 1;
		init.bytes = bytes;
		map_update(metrics, &key, &init, BPF_NOEXIST);
	}
}

#endif /* PYCILIUM_METRICS_H */
