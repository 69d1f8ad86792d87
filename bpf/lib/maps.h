/* SPDX-License-Identifier: Apache-2.0 */
/* Access to the datapath maps. The loader (bpf/loader.py) creates or reopens every map pinned under
 * the node's bpf root, from the specs in bpf/maps/, and compiles each map's fd in as MAP_FD_<name>;
 * C code reaches a map with MAP(name) and the plain bpf_map_* helpers, so helpers in any header can
 * use any map. Layouts are in map_layouts.h. */
#ifndef PYCILIUM_MAPS_H
#define PYCILIUM_MAPS_H

#include "map_layouts.h"

#define MAP(name) ((void *)bpf_pseudo_fd(1, MAP_FD_##name))
#define map_lookup(name, key) bpf_map_lookup_elem(MAP(name), (key))
#define map_update(name, key, value, flags) bpf_map_update_elem(MAP(name), (key), (value), (flags))
#define map_delete(name, key) bpf_map_delete_elem(MAP(name), (key))

#endif /* PYCILIUM_MAPS_H */
