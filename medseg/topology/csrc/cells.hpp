// Cells, filtration order and result types of the medseg persistent-homology engine.
//
// This header is the single definition shared by every backend (the CPU engine in
// engine.cpp and, later, a CUDA backend): how a cube is named by an integer, how two
// cubes are ordered, and what a result looks like.
//
// Lattice. A 2D or 3D image is a lattice of n0 x n1 x n2 points (2D images use n2 = 1).
// In the V-construction the points are the voxels; in the T-construction they are the
// corners of the voxels (one more per axis) and the voxels are the top cells.
//
// Packed cell index. A cube is given by its base point b (its smallest corner) and the
// axes it spans. With lin(b) = (b0 * n1 + b1) * n2 + b2:
//   vertex:       cell = lin(b)
//   edge along t: cell = 3 * lin(b) + t                  (t = 0, 1, 2)
//   square with normal t (spanning the two other axes): cell = 3 * lin(b) + t
//   cube:         cell = lin(b)
// so that, within one dimension, the packed index orders cells lexicographically by
// (b0, b1, b2, type). This is the "x-y-z-type" tie-break of Betti-Matching-3D.
//
// Filtration order. Values are first replaced by the dense ranks of their order_bits
// (below; equal values get equal ranks, see engine.cpp and spanning.hpp), so a cell's
// filtration value is a 32-bit rank. Cells of one dimension are totally ordered by
// the 64-bit key (rank << 32) | cell, i.e. by (value, packed index): ties in value are
// broken by the packed index. Comparing keys is a single integer comparison on the
// hot paths (sorting, union-find, the heap of the matrix reduction). The persistence
// pairs are a function of this order only, so any correct reduction yields the same
// pairs as the reference implementation.
//
// Size limit. The packed index must fit in the low 32 bits of the key, so 3 * points
// < 2^32: at most 1,431,655,765 lattice points per image (e.g. 1100^3), checked at
// run time. Coordinates themselves are 64-bit; there is no per-axis limit.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "big_vector.hpp"

// Functions that the CUDA backend also calls on the device (see parallel.hpp).
#if defined(__CUDACC__)
#define MEDSEG_HD __host__ __device__
#else
#define MEDSEG_HD
#endif

namespace medseg {

using rank_t = std::uint32_t;
using key_t = std::uint64_t;

constexpr rank_t kInfRank = std::numeric_limits<rank_t>::max();  // cell does not exist
constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();
constexpr key_t kNoKey = std::numeric_limits<key_t>::max();
constexpr std::int64_t kMaxPoints = 1431655765;  // 3 * points < 2^32

MEDSEG_HD inline key_t make_key(rank_t rank, std::uint64_t cell) {
    return (static_cast<key_t>(rank) << 32) | cell;
}
MEDSEG_HD inline rank_t key_rank(key_t key) { return static_cast<rank_t>(key >> 32); }
MEDSEG_HD inline std::uint32_t key_cell(key_t key) { return static_cast<std::uint32_t>(key); }

// Order-preserving unsigned image of a value, from which every backend's dense ranks
// are sorted; -0.0 is folded onto +0.0 so that the two tie, as they compare equal as
// floating-point numbers. One definition for the host and the device: any difference
// between backends here would change ties, and so the pairs.
MEDSEG_HD inline std::uint64_t order_bits(float v) {
    if (v == 0.0f) v = 0.0f;
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return u;
}
MEDSEG_HD inline std::uint64_t order_bits(double v) {
    if (v == 0.0) v = 0.0;
    std::uint64_t u;
    std::memcpy(&u, &v, sizeof u);
    u = (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
    return u;
}

struct Lattice;
MEDSEG_HD inline void square_edges(const Lattice& L, std::uint32_t cell, std::uint32_t out[4]);

struct Lattice {
    std::int64_t n[3] = {1, 1, 1};
    std::int64_t stride[3] = {1, 1, 1};
    std::int64_t points = 1;
    int ndim = 2;  // 2 or 3: the dimension of the complex (top cells)

    Lattice() = default;
    MEDSEG_HD Lattice(int ndim_, std::int64_t n0, std::int64_t n1, std::int64_t n2) : ndim(ndim_) {
        n[0] = n0;
        n[1] = n1;
        n[2] = n2;
        stride[2] = 1;
        stride[1] = n2;
        stride[0] = n1 * n2;
        points = n0 * n1 * n2;
    }
    MEDSEG_HD std::int64_t lin(std::int64_t x, std::int64_t y, std::int64_t z) const {
        return (x * n[1] + y) * n[2] + z;
    }
    // Lattices that fit the packed index (points <= kMaxPoints < 2^32) take 32-bit
    // divisions, several times cheaper than 64-bit ones (reporting the voxels of a 2D
    // matching spent most of its time in them); 2D lattices (n2 = 1) skip one.
    MEDSEG_HD void coords(std::int64_t l, std::int64_t c[3]) const {
        if (points <= 0xffffffffll) {
            std::uint32_t u = static_cast<std::uint32_t>(l);
            if (n[2] == 1) {
                c[2] = 0;
            } else {
                c[2] = u % static_cast<std::uint32_t>(n[2]);
                u /= static_cast<std::uint32_t>(n[2]);
            }
            c[1] = u % static_cast<std::uint32_t>(n[1]);
            c[0] = u / static_cast<std::uint32_t>(n[1]);
            return;
        }
        c[2] = l % n[2];
        l /= n[2];
        c[1] = l % n[1];
        c[0] = l / n[1];
    }
};

// The 4 edges of a square (packed cell, normal t, spanning the two other axes u < w).
MEDSEG_HD inline void square_edges(const Lattice& L, std::uint32_t cell, std::uint32_t out[4]) {
    const std::int64_t l = cell / 3;
    const int t = static_cast<int>(cell % 3);
    const int u = (t == 0) ? 1 : 0, w = (t == 2) ? 1 : 2;
    out[0] = static_cast<std::uint32_t>(3 * l + u);
    out[1] = static_cast<std::uint32_t>(3 * (l + L.stride[w]) + u);
    out[2] = static_cast<std::uint32_t>(3 * l + w);
    out[3] = static_cast<std::uint32_t>(3 * (l + L.stride[u]) + w);
}

// One persistence pair, as packed cells of the complex it was computed on.
// birth_cell has dimension d, death_cell dimension d + 1.
struct CellPair {
    std::uint32_t birth_cell;
    std::uint32_t death_cell;
};

// Voxel coordinates of pairs in one homology dimension, row-major (n, ndim). In recycled
// blocks (big_vector.hpp): they go to Python as they are and come back to the engine's
// cache when Python frees them, so the next call writes its coordinates to pages
// already mapped (fresh ones cost a page fault each: ~10% of a 512^2 matching).
struct VoxelPairs {
    big_vector<std::int64_t> birth;
    big_vector<std::int64_t> death;
    std::size_t size(int ndim) const { return birth.size() / static_cast<std::size_t>(ndim); }
};

struct BarcodeResult {
    int ndim = 0;
    std::vector<VoxelPairs> pairs;     // one entry per dimension 0 .. ndim-1
    std::vector<std::int64_t> essential_birth;  // the essential class of dimension 0
};

struct MatchingResult {
    int ndim = 0;
    std::vector<VoxelPairs> matched_a, matched_b;   // row i of a is matched with row i of b
    std::vector<VoxelPairs> unmatched_a, unmatched_b;
    std::vector<std::int64_t> num_unmatched_a, num_unmatched_b;  // counted even when not returned
};

enum class Construction { V, T };

struct Options {
    bool superlevel = false;
    Construction construction = Construction::V;
    bool intersection = false;  // comparison image: union (default) or intersection
    bool include_unmatched_a = true;
    bool include_unmatched_b = true;
    // Coordinates of b's pairs (matched and, with include_unmatched_b, unmatched); false
    // leaves them out and counts alone come back (a binary target's pairs all run from
    // one value to the other: the loss needs no coordinates of them).
    bool report_b = true;
    // Each reported voxel as its C-order index in the image (one int64) instead of ndim
    // coordinates (VoxelPairs then hold one entry per voxel); compute_matching only.
    bool flat_indices = false;
    int threads = 1;  // threads used inside one computation
};

}  // namespace medseg
