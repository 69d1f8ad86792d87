/* SPDX-License-Identifier: Apache-2.0 */
/* Per-CPU forward/drop counters by reason and direction. */
#ifndef PYCILIUM_METRICS_H
#define PYCILIUM_METRICS_H

#include "common.h"

static __always_inline void update_metrics(__u32 bytes, __u8 reason, __u8 dir)
{
	__u32 idx = (__u32)reason | ((__u32)(dir & 7) << 8);
	struct metrics_value *v = map_lookup(metrics, &idx);

	if (likely(v)) { /* this CPU's slot: no atomics needed */
		v->count += 1;
		v->bytes += bytes;
	}
}

#endif /* PYCILIUM_METRICS_H */
