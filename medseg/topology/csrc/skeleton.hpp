// Topology-preserving thinning of 2D and 3D binary masks: medseg.topology.skeletonize.
//
// Why not scikit-image: its 3D skeletonize is Lee et al.'s thinning as implemented in
// ITK, which deletes whole objects (a bar 2, 4 or 6 voxels thick has an empty skeleton;
// scikit-image issue 3757). A skeleton taken for a paper's clDice or Skeleton Recall
// must not lose a component or a loop, so medseg thins with a test that cannot.
//
// Algorithm: directional (sub-iterative) thinning by deletion of simple points.
// - One sub-iteration per face direction (up, down, north, south, east, west in 3D;
//   four in 2D), as in K. Palagyi and A. Kuba, "A 3D 6-subiteration thinning algorithm
//   for extracting medial lines", Pattern Recognition Letters 19 (1998) 613-627: a
//   sub-iteration may delete only border points of its direction (the neighbour on
//   that side is background), so the object is peeled alternately from each side and
//   the skeleton stays near the middle.
// - A point may be deleted only if it is simple (deleting it changes no component,
//   loop or cavity of the object or of the background) and not an end point (exactly
//   one object neighbour), so branches are not shortened away. Simple points are
//   recognised by the topological numbers of G. Bertrand and G. Malandain, "A new
//   characterization of three-dimensional simple points", Pattern Recognition Letters
//   15 (1994) 169-175: with foreground connectivity 26 (background 6), x is simple iff
//   T26(x, X) = 1 and T6(x, X^c) = 1; with 6/26 iff T6(x, X) = 1 and T26(x, X^c) = 1.
//   In 2D the same numbers with 8/4 (or 4/8) in the 3x3 neighbourhood.
// - Candidates of a sub-iteration are found in parallel on the image as it was at the
//   start of the sub-iteration, then re-checked and deleted one at a time, as Lee,
//   Kashyap and Chu (1994) do. Deleting simple points one at a time preserves topology
//   whatever the order. The order is fixed so the result does not depend on threads:
//   candidates in planes (rows in 2D) of even index first, each plane in raster order,
//   then the odd planes. A deletion in plane z reads planes z-1..z+1 and writes plane
//   z only, so planes of equal parity are independent and run on separate threads.
// - When a full cycle of directions deletes nothing, one more sub-iteration accepts
//   any simple non-end point (with 6- or 4-connected foreground a simple point need not
//   have a background face neighbour); the thinning stops when that deletes nothing
//   either. So the result has no deletable point left: thinning it again changes nothing.
//
// The simple-point test is a table lookup: 2^8 entries in 2D, computed up front; 2^26
// entries in 3D, 2 bits each (16 MiB of address space, pages touched on demand), filled
// lazily by a bitmask flood fill the first time a neighbourhood is seen.
#pragma once

#include <cstdint>
#include <vector>

namespace medseg {

// The skeleton of a binary mask (non-zero = foreground), C order, shape[0] slowest.
// full_connectivity: foreground 8 (2D) / 26 (3D) with background 4 / 6; else 4 / 6
// with 8 / 26. Returns one byte per voxel, 1 on the skeleton.
std::vector<std::uint8_t> skeletonize_mask(const std::uint8_t* mask, int ndim, const std::int64_t* shape,
                                           bool full_connectivity, int threads);

// Whether the centre of a 3x3(x3) neighbourhood is simple; `config` has bit k set when
// neighbour k (k = ((dz+1)*3 + dy+1)*3 + dx+1, centre bit ignored) is foreground.
// Exposed for the tests.
bool is_simple_point(std::uint32_t config, int ndim, bool full_connectivity);

}  // namespace medseg
