// Data-parallel barcode of dimensions 0 and d-1, written once for CPU threads and
// CUDA (parallel.hpp supplies the execution: HostExec or DeviceExec).
//
// Why the result is exactly the sequential engine's (engine.cpp):
//   * Ranks. The same order bits (cells.hpp's order_bits) and a stable radix sort of
//     (bits, index) give the same dense ranks, so every cell gets the same key
//     (rank << 32) | cell, and keys of one dimension are unique.
//   * Dimension 0. The sequential engine runs Kruskal over all edges in key order; an
//     edge that merges nothing is skipped. With unique keys the minimum spanning
//     forest (MSF) is unique and is exactly the set of edges Kruskal merges along, in
//     the same order. So: find the MSF in parallel (Boruvka), then run the same
//     elder-rule union-find over the MSF edges only (at most points - 1 of them): the
//     same merges in the same order give the same pairs, ties included.
//   * Dimension d-1. The same on the dual graph (top cells plus the point at
//     infinity, faces as edges), processed in decreasing order: a maximum spanning
//     forest, found as the MSF of the complemented keys.
//   * Coordinates. CellReporter below is the engine's Reporter over raw arrays.
//
// Boruvka round (all of it is launches over vertices or edges):
//   1. every edge between two different components offers its key to both roots
//      (atomic min); 2. every root hooks onto the component across its lightest
//      edge and marks that edge as a forest edge; with unique keys the only cycles of
//      the hooks are mutual pairs, broken towards the smaller root; 3. pointer jumping
//      until every vertex points at its root. Rounds end when no root has an edge.
#pragma once

#include <cstdint>
#include <vector>

#include "parallel.hpp"

namespace medseg {
namespace par {

// ---------------------------------------------------------------------------------
// Ranks

struct KeysF32 {  // key = (order bits << 32) | index
    const float* x;
    std::uint64_t* keys;
    MEDSEG_HD void operator()(std::size_t i) const { keys[i] = (order_bits(x[i]) << 32) | i; }
};
struct KeysF64 {  // key = order bits, value = index
    const double* x;
    std::uint64_t* keys;
    std::uint32_t* idx;
    MEDSEG_HD void operator()(std::size_t i) const {
        keys[i] = order_bits(x[i]);
        idx[i] = static_cast<std::uint32_t>(i);
    }
};
// new_value[i] = 1 where sorted position i starts a new value.
struct NewValue {
    const std::uint64_t* keys;
    std::uint64_t mask;  // the bits that hold the value
    std::uint32_t* flag;
    MEDSEG_HD void operator()(std::size_t i) const {
        flag[i] = (i == 0 || (keys[i] & mask) != (keys[i - 1] & mask)) ? 1u : 0u;
    }
};
struct ScatterRanks {
    const std::uint64_t* keys;
    const std::uint32_t* idx;  // null: the index is the low half of the key
    const std::uint32_t* scan;
    rank_t* ranks;
    MEDSEG_HD void operator()(std::size_t i) const {
        const std::uint32_t at = idx ? idx[i] : static_cast<std::uint32_t>(keys[i]);
        ranks[at] = scan[i] - 1;
    }
};
struct Reverse {
    rank_t* ranks;
    rank_t num;
    MEDSEG_HD void operator()(std::size_t i) const { ranks[i] = num - 1 - ranks[i]; }
};

// ---------------------------------------------------------------------------------
// Cell ranks: the filtration of every edge, square and cube (engine.cpp's
// build_edges_faces_cubes_V and build_T, one cell per index).

struct Cells {
    Lattice L;       // points of the complex
    Lattice P;       // T: voxels (top cells); V: = L
    bool T = false;
    rank_t* v = nullptr;        // L.points
    rank_t* e = nullptr;        // 3 L.points
    rank_t* f = nullptr;        // 3 L.points
    rank_t* c = nullptr;        // L.points (3D)
    const rank_t* pix = nullptr;  // T: P.points
    const rank_t* squares = nullptr;  // 2D V, optional: the squares' ranks by base point (then f is unused)

    MEDSEG_HD rank_t top(std::int64_t l) const { return L.ndim == 3 ? c[l] : f[3 * l + 2]; }
    MEDSEG_HD const rank_t* sub() const { return L.ndim == 3 ? f : e; }
};

MEDSEG_HD inline void other_axes_hd(int t, int& u, int& w) {
    u = (t == 0) ? 1 : 0;
    w = (t == 2) ? 1 : 2;
}

// V: a cell's rank is the largest rank of its corners; ext[a] = the cell spans axis a.
MEDSEG_HD inline rank_t corner_max(const Cells& X, const std::int64_t b[3], const bool ext[3]) {
    rank_t r = 0;
    for (int dx = 0; dx <= (ext[0] ? 1 : 0); ++dx)
        for (int dy = 0; dy <= (ext[1] ? 1 : 0); ++dy)
            for (int dz = 0; dz <= (ext[2] ? 1 : 0); ++dz)
                r = max_of(r, X.v[X.L.lin(b[0] + dx, b[1] + dy, b[2] + dz)]);
    return r;
}
// T: a cell's rank is the smallest rank of the voxels containing it.
MEDSEG_HD inline rank_t voxel_min(const Cells& X, const std::int64_t b[3], const bool ext[3]) {
    std::int64_t lo[3], hi[3];
    for (int a = 0; a < 3; ++a) {
        if (a >= X.L.ndim || ext[a]) {
            lo[a] = hi[a] = b[a];
        } else {
            lo[a] = b[a] > 0 ? b[a] - 1 : 0;
            hi[a] = b[a] < X.P.n[a] - 1 ? b[a] : X.P.n[a] - 1;
        }
    }
    rank_t r = kInfRank;
    for (std::int64_t x = lo[0]; x <= hi[0]; ++x)
        for (std::int64_t y = lo[1]; y <= hi[1]; ++y)
            for (std::int64_t z = lo[2]; z <= hi[2]; ++z) r = min_of(r, X.pix[X.P.lin(x, y, z)]);
    return r;
}

// All cells based at point l (vertex, 3 edges, 3 squares, cube); absent cells get kInfRank.
struct BuildCells {
    Cells X;
    MEDSEG_HD rank_t rank(const std::int64_t b[3], const bool ext[3]) const {
        return X.T ? voxel_min(X, b, ext) : corner_max(X, b, ext);
    }
    MEDSEG_HD void operator()(std::size_t i) const {
        const Lattice& L = X.L;
        const std::int64_t l = static_cast<std::int64_t>(i);
        std::int64_t b[3];
        L.coords(l, b);
        bool fits[3];
        for (int a = 0; a < 3; ++a) fits[a] = b[a] + 1 < L.n[a];
        if (X.T) {
            const bool none[3] = {false, false, false};
            X.v[l] = rank(b, none);
        }
        for (int t = 0; t < 3; ++t) {
            bool ext[3] = {false, false, false};
            ext[t] = true;
            X.e[3 * l + t] = fits[t] ? rank(b, ext) : kInfRank;
        }
        for (int t = 0; t < 3; ++t) {
            int u, w;
            other_axes_hd(t, u, w);
            bool ext[3] = {true, true, true};
            ext[t] = false;
            rank_t r = kInfRank;
            if (fits[u] && fits[w]) {
                // 3D T squares need a voxel on either side (engine: b_t + 1 < n_t or b_t > 0)
                if (X.T && L.ndim == 3) {
                    const bool ok = fits[t] || b[t] > 0;
                    r = ok ? voxel_min(X, b, ext) : kInfRank;
                } else {
                    r = rank(b, ext);
                }
            }
            X.f[3 * l + t] = r;
        }
        if (L.ndim == 3) {
            const bool all[3] = {true, true, true};
            X.c[l] = (fits[0] && fits[1] && fits[2]) ? rank(b, all) : kInfRank;
        }
    }
};

// ---------------------------------------------------------------------------------
// Graphs for Boruvka: a weight per edge slot (kNoKey: no such edge), its endpoints,
// and the slot back from a weight.

struct PrimalEdges {  // vertices: points; edges: 1-cells, weight = key
    Lattice L;
    const rank_t* e;
    MEDSEG_HD std::uint64_t weight(std::size_t i) const {
        return e[i] == kInfRank ? kNoKey : make_key(e[i], i);
    }
    MEDSEG_HD void ends(std::size_t i, std::uint32_t& a, std::uint32_t& b) const {
        a = static_cast<std::uint32_t>(i / 3);
        b = static_cast<std::uint32_t>(a + L.stride[i % 3]);
    }
    MEDSEG_HD std::size_t slot(std::uint64_t w) const { return key_cell(w); }
    std::size_t vertices() const { return static_cast<std::size_t>(L.points); }
};

// Dual graph: vertices are the top cells (by base point) and infinity (= L.points);
// an edge is a (d-1)-cell between the two top cells it bounds, weight = ~key so that
// the minimum spanning forest of the weights is the maximum one of the keys.
struct DualFaces {
    Lattice L;
    const rank_t* sub;  // ranks of the (d-1)-cells
    const rank_t* topr; // a top cell's rank by base point: c (3D) or every third f (2D)
    int top_stride;     // 1 (3D: c[l]) or 3 with offset 2 (2D: f[3l + 2])
    int top_offset;
    bool have_top;
    MEDSEG_HD rank_t top(std::int64_t l) const { return topr[top_stride * l + top_offset]; }
    MEDSEG_HD std::uint64_t weight(std::size_t i) const {
        if (!have_top || sub[i] == kInfRank) return kNoKey;
        std::uint32_t a, b;
        ends(i, a, b);
        if (a == b) return kNoKey;  // both sides at infinity: never merges
        return ~make_key(sub[i], i);
    }
    MEDSEG_HD void ends(std::size_t i, std::uint32_t& a, std::uint32_t& b) const {
        const std::uint32_t inf = static_cast<std::uint32_t>(L.points);
        const std::int64_t l = static_cast<std::int64_t>(i / 3);
        const int t = static_cast<int>(i % 3);
        const std::int64_t s = L.stride[L.ndim == 3 ? t : 1 - t];
        b = top(l) != kInfRank ? static_cast<std::uint32_t>(l) : inf;
        a = (l >= s && top(l - s) != kInfRank) ? static_cast<std::uint32_t>(l - s) : inf;
    }
    MEDSEG_HD std::size_t slot(std::uint64_t w) const { return key_cell(~w); }
    std::size_t vertices() const { return static_cast<std::size_t>(L.points) + 1; }
};

template <class G>
struct OfferEdges {
    G g;
    const std::uint32_t* parent;
    std::uint64_t* best;
    MEDSEG_HD void operator()(std::size_t i) const {
        const std::uint64_t w = g.weight(i);
        if (w == kNoKey) return;
        std::uint32_t a, b;
        g.ends(i, a, b);
        const std::uint32_t ra = parent[a], rb = parent[b];
        if (ra == rb) return;
        atomic_min_u64(&best[ra], w);
        atomic_min_u64(&best[rb], w);
    }
};

template <class G>
struct ChooseEdges {
    G g;
    const std::uint32_t* parent;
    const std::uint64_t* best;
    std::uint32_t* next;
    std::uint32_t* in_forest;
    std::uint32_t* changed;
    MEDSEG_HD void operator()(std::size_t r) const {
        next[r] = static_cast<std::uint32_t>(r);
        if (parent[r] != r || best[r] == kNoKey) return;
        const std::size_t s = g.slot(best[r]);
        std::uint32_t a, b;
        g.ends(s, a, b);
        const std::uint32_t ra = parent[a], rb = parent[b];
        next[r] = ra == r ? rb : ra;
        store_u32(&in_forest[s], 1u);  // both ends may mark the same edge
        store_u32(changed, 1u);
    }
};

struct Hook {
    const std::uint32_t* next;
    std::uint32_t* parent;
    MEDSEG_HD void operator()(std::size_t r) const {
        const std::uint32_t o = next[r];
        if (o == r) return;
        if (next[o] == r && r < o) return;  // mutual choice: the smaller root stays
        parent[r] = o;
    }
};

struct Jump {
    std::uint32_t* parent;
    std::uint32_t* changed;
    MEDSEG_HD void operator()(std::size_t v) const {
        const std::uint32_t p = load_u32(&parent[v]);
        const std::uint32_t pp = load_u32(&parent[p]);
        if (p != pp) {
            store_u32(&parent[v], pp);
            store_u32(changed, 1u);
        }
    }
};

template <class T>
struct Fill {
    T* p;
    T value;
    MEDSEG_HD void operator()(std::size_t i) const { p[i] = value; }
};
struct Iota {
    std::uint32_t* p;
    MEDSEG_HD void operator()(std::size_t i) const { p[i] = static_cast<std::uint32_t>(i); }
};
template <class G>
struct Weights {
    G g;
    std::uint64_t* w;
    MEDSEG_HD void operator()(std::size_t i) const { w[i] = g.weight(i); }
};

// Minimum spanning forest of g: its edges' weights, ascending. With flags_out, the
// per-slot forest flags stay where Exec computes (the matching's clearing uses them).
template <class Exec, class G>
std::vector<std::uint64_t> spanning_forest(const Exec& ex, const G& g, std::size_t slots, int key_bits,
                                           typename Exec::template Array<std::uint32_t>* flags_out = nullptr) {
    const std::size_t nv = g.vertices();
    auto parent = ex.template array<std::uint32_t>(nv);
    auto next = ex.template array<std::uint32_t>(nv);
    auto best = ex.template array<std::uint64_t>(nv);
    auto in_forest = ex.template array<std::uint32_t>(slots);
    auto changed = ex.template array<std::uint32_t>(1);
    ex.for_each(nv, Iota{parent.data()});
    ex.for_each(slots, Fill<std::uint32_t>{in_forest.data(), 0u});
    for (;;) {
        ex.for_each(nv, Fill<std::uint64_t>{best.data(), kNoKey});
        ex.write(changed.data(), 0u);
        ex.for_each(slots, OfferEdges<G>{g, parent.data(), best.data()});
        ex.for_each(nv, ChooseEdges<G>{g, parent.data(), best.data(), next.data(), in_forest.data(), changed.data()});
        if (!ex.read(changed.data())) break;
        ex.for_each(nv, Hook{next.data(), parent.data()});
        do {
            ex.write(changed.data(), 0u);
            ex.for_each(nv, Jump{parent.data(), changed.data()});
        } while (ex.read(changed.data()));
    }
    auto w = ex.template array<std::uint64_t>(slots);
    ex.for_each(slots, Weights<G>{g, w.data()});
    auto forest = ex.select_flagged(w.data(), in_forest.data(), slots);
    ex.sort_keys(forest.data(), forest.size(), 0, key_bits);
    if (flags_out) *flags_out = std::move(in_forest);
    return ex.to_host(forest.data(), forest.size());
}

// ---------------------------------------------------------------------------------
// Coordinates: the voxel a cell's value is read from (engine.cpp's Reporter).

struct CellReporter {
    Cells X;

    MEDSEG_HD void report(int k, std::uint64_t cell, std::int64_t out[3]) const {
        if (X.T) return report_T(k, cell, out);
        X.L.coords(vertex_V(k, cell), out);
    }

    // The reported voxel as its index in the image (C order): the vertex's own index in
    // V (the complex's vertices are the voxels), no division by the strides.
    MEDSEG_HD std::int64_t index(int k, std::uint64_t cell) const {
        if (!X.T) return vertex_V(k, cell);
        std::int64_t c[3];
        report_T(k, cell, c);
        return X.P.lin(c[0], c[1], c[2]);
    }

    // V: the corner of the cell holding its value (the first such of a fixed order).
    MEDSEG_HD std::int64_t vertex_V(int k, std::uint64_t cell) const {
        const Lattice& L = X.L;
        if (k == 0) return static_cast<std::int64_t>(cell);
        if (k == 1) {
            const std::int64_t l = static_cast<std::int64_t>(cell / 3);
            const int t = static_cast<int>(cell % 3);
            // the edge's rank is the larger of its ends' (V): the upper end when it holds it
            // (no edge ranks read: 2D engine filtrations keep none, edges_from_vertices)
            return X.v[l + L.stride[t]] >= X.v[l] ? l + L.stride[t] : l;
        }
        if (k == 2) {
            const std::int64_t l = static_cast<std::int64_t>(cell / 3);
            int u, w;
            other_axes_hd(static_cast<int>(cell % 3), u, w);
            const rank_t r = X.squares ? X.squares[l] : X.f[cell];
            const std::int64_t cand[4] = {l + L.stride[u] + L.stride[w], l + L.stride[u], l + L.stride[w], l};
            for (int q = 0; q < 4; ++q)
                if (X.v[cand[q]] == r) return cand[q];
            return l;
        }
        const std::int64_t l = static_cast<std::int64_t>(cell);
        const rank_t r = X.c[l];
        for (int dx = 0; dx < 2; ++dx)
            for (int dy = 0; dy < 2; ++dy)
                for (int dz = 0; dz < 2; ++dz) {
                    const std::int64_t q = l + dx * L.stride[0] + dy * L.stride[1] + dz * L.stride[2];
                    if (X.v[q] == r) return q;
                }
        return l;
    }

    MEDSEG_HD void report_T(int k, std::uint64_t cell, std::int64_t out[3]) const {
        const Lattice& L = X.L;
        const Lattice& P = X.P;
        std::int64_t l;
        bool extends[3] = {false, false, false};
        rank_t r;
        if (k == 0) {
            l = static_cast<std::int64_t>(cell);
            r = X.v[l];
        } else if (k == L.ndim) {
            l = static_cast<std::int64_t>(L.ndim == 3 ? cell : cell / 3);
            r = X.top(l);
            extends[0] = extends[1] = extends[2] = true;
        } else if (k == 1) {
            l = static_cast<std::int64_t>(cell / 3);
            extends[cell % 3] = true;
            r = X.e[cell];
        } else {
            l = static_cast<std::int64_t>(cell / 3);
            extends[0] = extends[1] = extends[2] = true;
            extends[cell % 3] = false;
            r = X.f[cell];
        }
        std::int64_t b[3];
        L.coords(l, b);
        std::int64_t lo[3], hi[3];
        for (int a = 0; a < 3; ++a) {
            if (a >= L.ndim || extends[a]) {
                lo[a] = hi[a] = b[a];
            } else {
                lo[a] = b[a] > 0 ? b[a] - 1 : 0;
                hi[a] = b[a] < P.n[a] - 1 ? b[a] : P.n[a] - 1;
            }
        }
        for (std::int64_t x = lo[0]; x <= hi[0]; ++x)
            for (std::int64_t y = lo[1]; y <= hi[1]; ++y)
                for (std::int64_t z = lo[2]; z <= hi[2]; ++z)
                    if (X.pix[P.lin(x, y, z)] == r) {
                        out[0] = x;
                        out[1] = y;
                        out[2] = z;
                        return;
                    }
        out[0] = lo[0];
        out[1] = lo[1];
        out[2] = lo[2];
    }
};

// One reported pair per index: (dimension, cell) of birth and death -> coordinates.
struct ReportPairs {
    CellReporter rep;
    const std::uint64_t* cells;  // birth, death interleaved
    int kb, kd, ndim;
    std::int64_t* birth;  // (n, ndim)
    std::int64_t* death;
    MEDSEG_HD void operator()(std::size_t i) const {
        std::int64_t c[3];
        rep.report(kb, cells[2 * i], c);
        for (int a = 0; a < ndim; ++a) birth[i * ndim + a] = c[a];
        rep.report(kd, cells[2 * i + 1], c);
        for (int a = 0; a < ndim; ++a) death[i * ndim + a] = c[a];
    }
};

// ---------------------------------------------------------------------------------
// The driver: ranks, cells, both spanning forests, the elder-rule passes (host,
// over the forest edges only) and the coordinates. matching_parallel.hpp builds the
// barcode and the matching (and 3D dimension 1) on top of it.

inline int bit_width_u64(std::uint64_t x) {
    int b = 0;
    while (x) {
        ++b;
        x >>= 1;
    }
    return b;
}

// Image values: one of the two pointers is set (device memory for DeviceExec).
struct Values {
    const float* f32 = nullptr;
    const double* f64 = nullptr;
};

// The dense ranks of one image into `ranks` (P.points); returns their number.
template <class Exec, class Array>
rank_t rank_values(const Exec& ex, Values x, std::size_t n, bool superlevel, Array& ranks) {
    auto keys = ex.template array<std::uint64_t>(n);
    auto flag = ex.template array<std::uint32_t>(n);
    auto scan = ex.template array<std::uint32_t>(n);
    if (x.f32) {
        ex.for_each(n, KeysF32{x.f32, keys.data()});
        ex.sort_keys(keys.data(), n, 32, 64);
        ex.for_each(n, NewValue{keys.data(), 0xffffffff00000000ull, flag.data()});
        ex.inclusive_scan(flag.data(), scan.data(), n);
        ex.for_each(n, ScatterRanks{keys.data(), nullptr, scan.data(), ranks.data()});
    } else {
        auto idx = ex.template array<std::uint32_t>(n);
        ex.for_each(n, KeysF64{x.f64, keys.data(), idx.data()});
        ex.sort_pairs(keys.data(), idx.data(), n, 0, 64);
        ex.for_each(n, NewValue{keys.data(), ~0ull, flag.data()});
        ex.inclusive_scan(flag.data(), scan.data(), n);
        ex.for_each(n, ScatterRanks{keys.data(), idx.data(), scan.data(), ranks.data()});
    }
    const rank_t num = ex.read(scan.data() + (n - 1));
    if (superlevel) ex.for_each(n, Reverse{ranks.data(), num});
    return num;
}

struct TopRanks {  // a top cell's rank by base point (kInfRank: none)
    Cells X;
    rank_t* out;
    MEDSEG_HD void operator()(std::size_t l) const { out[l] = X.top(static_cast<std::int64_t>(l)); }
};

template <class Exec>
struct ParallelBarcode {
    const Exec& ex;
    typename Exec::template Array<rank_t> pix, v, e, f, c;
    Cells X;
    rank_t num_ranks = 0;

    ParallelBarcode(const Exec& ex_, Values x, int ndim, const std::int64_t shape[3], bool superlevel, bool T)
        : ex(ex_) {
        const Lattice P = ndim == 2 ? Lattice(2, shape[0], shape[1], 1) : Lattice(3, shape[0], shape[1], shape[2]);
        Lattice L = P;
        if (T) L = ndim == 2 ? Lattice(2, P.n[0] + 1, P.n[1] + 1, 1) : Lattice(3, P.n[0] + 1, P.n[1] + 1, P.n[2] + 1);
        pix = ex.template array<rank_t>(static_cast<std::size_t>(P.points));
        num_ranks = rank_values(ex, x, static_cast<std::size_t>(P.points), superlevel, pix);
        const std::size_t N = static_cast<std::size_t>(L.points);
        if (T) v = ex.template array<rank_t>(N);
        e = ex.template array<rank_t>(3 * N);
        f = ex.template array<rank_t>(3 * N);
        if (ndim == 3) c = ex.template array<rank_t>(N);
        X.L = L;
        X.P = P;
        X.T = T;
        X.pix = pix.data();
        X.v = T ? v.data() : pix.data();
        X.e = e.data();
        X.f = f.data();
        X.c = ndim == 3 ? c.data() : nullptr;
        ex.for_each(N, BuildCells{X});
    }

    // The minimum spanning forest of the edges, ascending keys.
    std::vector<std::uint64_t> forest0() const {
        const std::size_t N = static_cast<std::size_t>(X.L.points);
        return spanning_forest(ex, PrimalEdges{X.L, X.e}, 3 * N, 32 + bit_width_u64(num_ranks));
    }
    std::vector<rank_t> vertex_ranks() const { return ex.to_host(X.v, static_cast<std::size_t>(X.L.points)); }

    int key_bits() const { return 32 + bit_width_u64(num_ranks); }
    bool have_top() const {
        bool h = true;
        for (int a = 0; a < X.L.ndim; ++a) h = h && X.L.n[a] >= 2;
        return h;
    }
    DualFaces dual_graph() const {
        const Lattice& L = X.L;
        return DualFaces{L, X.sub(), L.ndim == 3 ? X.c : X.f, L.ndim == 3 ? 1 : 3, L.ndim == 3 ? 0 : 2, have_top()};
    }
    // The maximum spanning forest of the dual graph (weights ~key, ascending); with
    // flags, which (d-1)-cells are in it (where Exec computes).
    std::vector<std::uint64_t> forest_top(typename Exec::template Array<std::uint32_t>* flags = nullptr) const {
        return spanning_forest(ex, dual_graph(), 3 * static_cast<std::size_t>(X.L.points), 64, flags);
    }
    // Host ranks of the top cells by base point (kInfRank: none), plus the point at
    // infinity (kInfRank), as host::top_pass reads them.
    std::vector<rank_t> top_ranks() const {
        const std::size_t N = static_cast<std::size_t>(X.L.points);
        auto r = ex.template array<rank_t>(N);
        ex.for_each(N, TopRanks{X, r.data()});
        std::vector<rank_t> h = ex.to_host(r.data(), N);
        h.push_back(kInfRank);
        return h;
    }
    std::uint32_t essential(const std::vector<rank_t>& vh) const {
        std::uint32_t best = 0;
        for (std::uint32_t l = 1; l < vh.size(); ++l)
            if (make_key(vh[l], l) < make_key(vh[best], best)) best = l;
        return best;
    }

    // Coordinates of pairs of dimensions (kb, kd), given as (birth cell, death cell)
    // interleaved, computed where the filtration lives; only coordinates come back.
    void report(const std::vector<std::uint64_t>& cells, int kb, int kd, VoxelPairs& out) const {
        const std::size_t n = cells.size() / 2;
        const int nd = X.L.ndim;
        if (n == 0) return;
        auto dc = ex.from_host(cells);
        auto b = ex.template array<std::int64_t>(n * nd);
        auto d = ex.template array<std::int64_t>(n * nd);
        ex.for_each(n, ReportPairs{CellReporter{X}, dc.data(), kb, kd, nd, b.data(), d.data()});
        const auto hb = ex.to_host(b.data(), n * nd);
        const auto hd = ex.to_host(d.data(), n * nd);
        out.birth.assign(hb.begin(), hb.end());
        out.death.assign(hd.begin(), hd.end());
    }
};

template <class T>
struct Combine {  // the comparison image: elementwise max or min (std::max / std::min)
    const T* a;
    const T* b;
    T* c;
    bool take_max;
    MEDSEG_HD void operator()(std::size_t i) const { c[i] = take_max ? max_of(a[i], b[i]) : min_of(a[i], b[i]); }
};

}  // namespace par
}  // namespace medseg
