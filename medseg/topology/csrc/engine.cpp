// CPU backend of the medseg persistent-homology engine.
//
// Pipeline for one image X (barcode) or one pair (Betti matching):
//   1. ranks: voxel values -> dense 32-bit ranks, one radix sort per image (each of
//      a, b and the comparison image is ranked on its own: only orders within one
//      filtration are ever compared). Superlevel filtrations reverse the ranks;
//      everything below is sublevel.
//   2. cell ranks: rank of every edge, square and cube (V: max over its vertices;
//      T: min over the top cells containing it), then the cells of each dimension
//      sorted by key = (rank, packed index) with an LSD radix sort on the rank bits.
//   3. top dimension (d-1 pairs) by union-find on the dual graph (top cells plus a
//      point at infinity), faces processed in decreasing order. Faces that merge are
//      positive and are cleared from the dimension-1 reduction.
//   4. dimension 1 in 3D by column reduction of the boundary matrix of the remaining
//      squares (all of them negative after clearing), left to right. A column whose
//      largest edge is not yet a pivot is paired at once (the apparent/emergent
//      shortcut: no working column, nothing stored); the others are reduced in a short
//      sorted working column (a bit tree when it grows long) and stored.
//   5. dimension 0 by union-find with the elder rule.
// For the matching, the image persistence of X -> comparison is computed with the
// comparison's column order and X's row order (dimension 1), and by carrying X's
// elder labels along the comparison's union-find forest (dimensions 0 and d-1): one
// forest per pass instead of one per image. With the intersection as comparison the
// inclusions point the other way (comparison -> X) and the roles swap.
//
// Tie-break (the reference's, Betti-Matching-3D): cells of one dimension are ordered
// by (rank, packed index), see cells.hpp; union-find elders by (rank, index) of their
// vertex / top cell, the point at infinity being the eldest. Reported voxels follow
// the reference too (Reporter below).
#include "engine.hpp"
#include "spanning.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>

namespace medseg {
namespace {

// Phase timings on stderr when MEDSEG_TOPOLOGY_PROFILE is set (development aid).
struct PhaseTimer {
    bool on = std::getenv("MEDSEG_TOPOLOGY_PROFILE") != nullptr;
    std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
    void mark(const char* what) {
        if (!on) return;
        auto now = std::chrono::steady_clock::now();
        std::fprintf(stderr, "[medseg.topology] %-28s %8.1f ms\n", what,
                     std::chrono::duration<double, std::milli>(now - t).count());
        t = now;
    }
};

// ---------------------------------------------------------------------------------
// Parallel tasks

void run_tasks(std::vector<std::function<void()>>& tasks, int threads) {
    if (threads <= 1 || tasks.size() <= 1) {
        for (auto& t : tasks) t();
        return;
    }
    std::atomic<std::size_t> next{0};
    std::vector<std::exception_ptr> errors(tasks.size());
    auto worker = [&]() {
        for (;;) {
            std::size_t i = next.fetch_add(1);
            if (i >= tasks.size()) return;
            try {
                tasks[i]();
            } catch (...) {
                errors[i] = std::current_exception();
            }
        }
    };
    int n = std::min<int>(threads, static_cast<int>(tasks.size()));
    std::vector<std::thread> pool;
    for (int i = 1; i < n; ++i) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

// ---------------------------------------------------------------------------------
// Radix sorts

constexpr int kDigitBits = 11;
constexpr std::uint64_t kDigitMask = (1u << kDigitBits) - 1;

// Stable LSD radix sort of 64-bit words by bits [lo, hi).
void radix_sort_u64(std::vector<std::uint64_t>& a, int lo, int hi) {
    if (a.size() < 2 || hi <= lo) return;
    std::vector<std::uint64_t> tmp(a.size());
    std::vector<std::size_t> count(std::size_t(1) << kDigitBits);
    for (int shift = lo; shift < hi; shift += kDigitBits) {
        std::fill(count.begin(), count.end(), 0);
        for (std::uint64_t x : a) ++count[(x >> shift) & kDigitMask];
        if (count[(a[0] >> shift) & kDigitMask] == a.size()) continue;  // one bucket
        std::size_t sum = 0;
        for (auto& c : count) {
            std::size_t t = c;
            c = sum;
            sum += t;
        }
        for (std::uint64_t x : a) tmp[count[(x >> shift) & kDigitMask]++] = x;
        a.swap(tmp);
    }
}

int bit_width(std::uint64_t x) {
    int b = 0;
    while (x) {
        ++b;
        x >>= 1;
    }
    return b;
}

// ---------------------------------------------------------------------------------
// Dense ranks

// Order-preserving unsigned image of a float; -0.0 is folded onto +0.0 so that the
// two compare equal, as they do as floating-point numbers.
inline std::uint64_t order_bits(float v) {
    if (v == 0.0f) v = 0.0f;
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return u;
}
inline std::uint64_t order_bits(double v) {
    if (v == 0.0) v = 0.0;
    std::uint64_t u;
    std::memcpy(&u, &v, sizeof u);
    u = (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
    return u;
}

// Dense ranks of the values of all images together (equal values, equal ranks).
// Returns the number of distinct values.
template <class T>
rank_t dense_ranks(const std::vector<const T*>& images, std::int64_t n,
                   std::vector<std::vector<rank_t>>& ranks, bool superlevel) {
    const std::size_t total = images.size() * static_cast<std::size_t>(n);
    ranks.assign(images.size(), std::vector<rank_t>(n));
    if (total == 0) return 0;
    std::uint64_t count = 0;
    auto assign = [&](std::uint64_t index, bool new_value) {
        if (new_value) ++count;
        ranks[index / n][index % n] = static_cast<rank_t>(count - 1);
    };
    if (sizeof(T) == 4) {
        std::vector<std::uint64_t> keys(total);
        for (std::size_t k = 0; k < images.size(); ++k)
            for (std::int64_t i = 0; i < n; ++i)
                keys[k * n + i] = (order_bits(images[k][i]) << 32) | (k * n + i);
        radix_sort_u64(keys, 32, 64);
        std::uint64_t prev = ~0ull;
        for (std::uint64_t x : keys) {
            assign(x & 0xffffffffull, (x >> 32) != prev);
            prev = x >> 32;
        }
    } else {
        // Sort by the upper 32 bits of the 64-bit order key with the index packed in
        // the lower half (3 radix passes over 8-byte words instead of 6 over 16-byte
        // records), then order the rare runs that tie on the upper half by full key.
        std::vector<std::uint64_t> keys(total);
        std::vector<std::uint64_t> full(total);
        for (std::size_t k = 0; k < images.size(); ++k)
            for (std::int64_t i = 0; i < n; ++i) {
                full[k * n + i] = order_bits(images[k][i]);
                keys[k * n + i] = (full[k * n + i] & 0xffffffff00000000ull) | (k * n + i);
            }
        radix_sort_u64(keys, 32, 64);
        for (std::size_t s = 0; s < total;) {
            std::size_t e = s + 1;
            while (e < total && (keys[e] >> 32) == (keys[s] >> 32)) ++e;
            if (e - s > 1) {
                const std::uint64_t f0 = full[keys[s] & 0xffffffffull];
                bool same = true;
                for (std::size_t q = s + 1; q < e && same; ++q) same = full[keys[q] & 0xffffffffull] == f0;
                if (!same)
                    std::sort(keys.begin() + s, keys.begin() + e, [&](std::uint64_t x, std::uint64_t y) {
                        return full[x & 0xffffffffull] < full[y & 0xffffffffull];
                    });
            }
            s = e;
        }
        bool first = true;
        std::uint64_t prev = 0;
        for (std::uint64_t x : keys) {
            const std::uint64_t f = full[x & 0xffffffffull];
            assign(x & 0xffffffffull, first || f != prev);
            prev = f;
            first = false;
        }
    }
    const rank_t num = static_cast<rank_t>(count);
    if (superlevel)
        for (auto& r : ranks)
            for (auto& x : r) x = num - 1 - x;
    return num;
}

// ---------------------------------------------------------------------------------
// Filtration: ranks of all cells of one complex

struct Filtration {
    Lattice L;                 // lattice of points of the complex
    Construction construction = Construction::V;
    Lattice pixels;            // T only: lattice of voxels (top cells)
    std::vector<rank_t> pix;   // T only: voxel ranks
    std::vector<rank_t> v, e, f, c;
    rank_t num_ranks = 0;

    int dim() const { return L.ndim; }
    rank_t top(std::int64_t l) const { return L.ndim == 3 ? c[l] : f[3 * l + 2]; }
    // rank of a (d-1)-cell
    const std::vector<rank_t>& sub() const { return L.ndim == 3 ? f : e; }
    key_t vkey(std::uint32_t l) const { return make_key(v[l], l); }
};

inline void other_axes(int t, int& u, int& w) {
    u = (t == 0) ? 1 : 0;
    w = (t == 2) ? 1 : 2;
}

void build_edges_faces_cubes_V(Filtration& F) {
    const Lattice& L = F.L;
    const std::int64_t N = L.points;
    F.e.assign(3 * N, kInfRank);
    F.f.assign(3 * N, kInfRank);
    if (L.ndim == 3) F.c.assign(N, kInfRank);
    for (std::int64_t x = 0; x < L.n[0]; ++x)
        for (std::int64_t y = 0; y < L.n[1]; ++y)
            for (std::int64_t z = 0; z < L.n[2]; ++z) {
                const std::int64_t l = L.lin(x, y, z);
                const std::int64_t b[3] = {x, y, z};
                const rank_t r = F.v[l];
                for (int t = 0; t < 3; ++t)
                    if (b[t] + 1 < L.n[t]) F.e[3 * l + t] = std::max(r, F.v[l + L.stride[t]]);
            }
    for (std::int64_t x = 0; x < L.n[0]; ++x)
        for (std::int64_t y = 0; y < L.n[1]; ++y)
            for (std::int64_t z = 0; z < L.n[2]; ++z) {
                const std::int64_t l = L.lin(x, y, z);
                const std::int64_t b[3] = {x, y, z};
                for (int t = 0; t < 3; ++t) {
                    int u, w;
                    other_axes(t, u, w);
                    if (b[u] + 1 < L.n[u] && b[w] + 1 < L.n[w])
                        F.f[3 * l + t] = std::max(F.e[3 * l + u], F.e[3 * (l + L.stride[w]) + u]);
                }
            }
    if (L.ndim != 3) return;
    for (std::int64_t x = 0; x + 1 < L.n[0]; ++x)
        for (std::int64_t y = 0; y + 1 < L.n[1]; ++y)
            for (std::int64_t z = 0; z + 1 < L.n[2]; ++z) {
                const std::int64_t l = L.lin(x, y, z);
                F.c[l] = std::max(F.f[3 * l], F.f[3 * (l + L.stride[0])]);
            }
}

// T-construction: the complex lives on the lattice of voxel corners; a cell's rank is
// the smallest rank of the voxels (top cells) that contain it.
void build_T(Filtration& F) {
    const Lattice& L = F.L;
    const Lattice& P = F.pixels;
    const std::int64_t N = L.points;
    F.v.assign(N, kInfRank);
    F.e.assign(3 * N, kInfRank);
    F.f.assign(3 * N, kInfRank);
    if (L.ndim == 3) F.c.assign(N, kInfRank);
    for (std::int64_t x = 0; x < P.n[0]; ++x)
        for (std::int64_t y = 0; y < P.n[1]; ++y)
            for (std::int64_t z = 0; z < P.n[2]; ++z) {
                const rank_t r = F.pix[P.lin(x, y, z)];
                const std::int64_t l = L.lin(x, y, z);
                if (L.ndim == 3) F.c[l] = r;
                else F.f[3 * l + 2] = r;
            }
    for (std::int64_t x = 0; x < L.n[0]; ++x)
        for (std::int64_t y = 0; y < L.n[1]; ++y)
            for (std::int64_t z = 0; z < L.n[2]; ++z) {
                const std::int64_t l = L.lin(x, y, z);
                const std::int64_t b[3] = {x, y, z};
                if (L.ndim == 3) {
                    for (int t = 0; t < 3; ++t) {
                        int u, w;
                        other_axes(t, u, w);
                        if (!(b[u] + 1 < L.n[u] && b[w] + 1 < L.n[w])) continue;
                        rank_t r = kInfRank;
                        if (b[t] + 1 < L.n[t]) r = std::min(r, F.c[l]);
                        if (b[t] > 0) r = std::min(r, F.c[l - L.stride[t]]);
                        F.f[3 * l + t] = r;
                    }
                }
            }
    for (std::int64_t x = 0; x < L.n[0]; ++x)
        for (std::int64_t y = 0; y < L.n[1]; ++y)
            for (std::int64_t z = 0; z < L.n[2]; ++z) {
                const std::int64_t l = L.lin(x, y, z);
                const std::int64_t b[3] = {x, y, z};
                for (int t = 0; t < L.ndim; ++t) {
                    if (!(b[t] + 1 < L.n[t])) continue;
                    rank_t r = kInfRank;
                    if (L.ndim == 3) {
                        // squares containing an edge along t: normal u (spanning t and w)
                        // at b and at b - e_w
                        for (int u = 0; u < 3; ++u) {
                            if (u == t) continue;
                            const int w = 3 - t - u;
                            r = std::min(r, F.f[3 * l + u]);
                            if (b[w] > 0) r = std::min(r, F.f[3 * (l - L.stride[w]) + u]);
                        }
                    } else {
                        const int u = 1 - t;
                        r = std::min(r, F.f[3 * l + 2]);
                        if (b[u] > 0) r = std::min(r, F.f[3 * (l - L.stride[u]) + 2]);
                    }
                    F.e[3 * l + t] = r;
                }
            }
    for (std::int64_t x = 0; x < L.n[0]; ++x)
        for (std::int64_t y = 0; y < L.n[1]; ++y)
            for (std::int64_t z = 0; z < L.n[2]; ++z) {
                const std::int64_t l = L.lin(x, y, z);
                const std::int64_t b[3] = {x, y, z};
                rank_t r = kInfRank;
                for (int t = 0; t < L.ndim; ++t) {
                    r = std::min(r, F.e[3 * l + t]);
                    if (b[t] > 0) r = std::min(r, F.e[3 * (l - L.stride[t]) + t]);
                }
                F.v[l] = r;
            }
}

// Sorted keys of all cells of one dimension that exist.
std::vector<key_t> sorted_keys(const std::vector<rank_t>& ranks, rank_t num_ranks) {
    std::size_t count = 0;
    for (rank_t r : ranks) count += (r != kInfRank);
    std::vector<key_t> keys;
    keys.reserve(count);
    for (std::size_t i = 0; i < ranks.size(); ++i)
        if (ranks[i] != kInfRank) keys.push_back(make_key(ranks[i], i));
    radix_sort_u64(keys, 32, 32 + bit_width(num_ranks));
    return keys;
}

// ---------------------------------------------------------------------------------
// Voxel reported for a cell: where its filtration value is read from.

struct Reporter {
    // The rules (V: the corner holding the cell's value; T: the first voxel containing the
    // cell with its value) live once, in par::CellReporter (spanning.hpp), which the
    // parallel and CUDA backends run too: all backends report the same voxels.
    par::CellReporter rep;

    explicit Reporter(const Filtration& F) : rep{view(F)} {}

    // Coordinates of the cell of dimension k with packed index cell.
    void report(int k, std::uint64_t cell, std::int64_t out[3]) const { rep.report(k, cell, out); }

    // A read-only view of F's arrays in the layout the shared reporter reads.
    static par::Cells view(const Filtration& F) {
        auto ptr = [](const std::vector<rank_t>& a) { return a.empty() ? nullptr : const_cast<rank_t*>(a.data()); };
        par::Cells X;
        X.L = F.L;
        X.T = F.construction == Construction::T;
        X.P = X.T ? F.pixels : F.L;
        X.v = ptr(F.v);
        X.e = ptr(F.e);
        X.f = ptr(F.f);
        X.c = ptr(F.c);
        X.pix = F.pix.empty() ? nullptr : F.pix.data();
        return X;
    }
};

// ---------------------------------------------------------------------------------
// Union-find

struct UnionFind {
    std::vector<std::uint32_t> parent;
    explicit UnionFind(std::size_t n) : parent(n) {
        std::iota(parent.begin(), parent.end(), 0u);
    }
    std::uint32_t find(std::uint32_t x) {
        while (parent[x] != x) {
            parent[x] = parent[parent[x]];  // path halving
            x = parent[x];
        }
        return x;
    }
};

// ---------------------------------------------------------------------------------
// Top dimension: union-find on the dual graph.

struct TopDim {
    std::vector<CellPair> pairs;   // (d-1)-cell, top cell
    std::vector<key_t> columns;    // (d-1)-cells that did not merge, ascending
};

// (d-1)-cell with normal axis u joins the top cells at b - e_u and b.
inline int normal_axis(const Lattice& L, std::uint32_t cell) {
    const int t = cell % 3;
    return L.ndim == 3 ? t : 1 - t;
}

// X: the complex; sub_sorted: its (d-1)-cells ascending. If comp is given, the comp
// elder of every component is carried along (image persistence into comp) and
// match_top[comp-younger top cell] receives the index of X's pair.
void top_dimension(const Filtration& X, const std::vector<key_t>& sub_sorted, const Filtration* comp,
                   std::vector<std::int32_t>* match_top, TopDim& out, bool keep_columns) {
    const Lattice& L = X.L;
    const std::uint32_t inf = static_cast<std::uint32_t>(L.points);
    UnionFind uf(L.points + 1);
    std::vector<std::uint32_t> label;
    if (comp) {
        label.resize(L.points + 1);
        std::iota(label.begin(), label.end(), 0u);
        match_top->assign(L.points + 1, -1);
    }
    // Compact copies of the top-cell ranks (in 2D they are every third square rank),
    // with the point at infinity last and largest.
    auto compact_top = [&](const Filtration& F) {
        std::vector<key_t> k(L.points + 1);
        for (std::int64_t p = 0; p < L.points; ++p)
            k[p] = F.top(p) == kInfRank ? kNoKey : make_key(F.top(p), static_cast<std::uint64_t>(p));
        k[L.points] = kNoKey;
        return k;
    };
    const std::vector<key_t> xtop = compact_top(X);
    const std::vector<key_t> ctop = comp ? compact_top(*comp) : std::vector<key_t>();
    auto xkey = [&](std::uint32_t p) { return xtop[p]; };
    auto ckey = [&](std::uint32_t p) { return ctop[p]; };
    const bool have_top = [&] {
        for (int a = 0; a < L.ndim; ++a)
            if (L.n[a] < 2) return false;
        return true;
    }();
    if (keep_columns) out.columns.reserve(sub_sorted.size());
    for (auto it = sub_sorted.rbegin(); it != sub_sorted.rend(); ++it) {
        const key_t key = *it;
        const std::uint32_t cell = key_cell(key);
        if (!have_top) {
            if (keep_columns) out.columns.push_back(key);
            continue;
        }
        // The top cell at b exists iff b_u + 1 < n_u, i.e. iff its rank is finite; the
        // one at b - e_u iff b_u > 0: for b_u = 0 the index l - stride_u is either
        // negative (u = 0) or a cell in the last layer of a lower axis, which has no
        // top cell either. So no coordinates (no divisions) are needed.
        const std::int64_t l = cell / 3;
        const std::int64_t s = L.stride[normal_axis(L, cell)];
        const std::uint32_t p1 = xtop[l] != kNoKey ? static_cast<std::uint32_t>(l) : inf;
        const std::uint32_t p0 = (l >= s && xtop[l - s] != kNoKey) ? static_cast<std::uint32_t>(l - s) : inf;
        const std::uint32_t r0 = uf.find(p0), r1 = uf.find(p1);
        if (r0 == r1) {
            if (keep_columns) out.columns.push_back(key);
            continue;
        }
        const bool first_younger = xkey(r0) < xkey(r1);
        const std::uint32_t younger = first_younger ? r0 : r1;
        const std::uint32_t elder = first_younger ? r1 : r0;
        uf.parent[younger] = elder;
        std::uint32_t comp_younger = 0;
        if (comp) {
            const std::uint32_t c0 = label[r0], c1 = label[r1];
            const bool c0_younger = ckey(c0) < ckey(c1);
            comp_younger = c0_younger ? c0 : c1;
            label[elder] = c0_younger ? c1 : c0;
        }
        if (key_rank(xtop[younger]) != key_rank(key)) {
            if (comp) (*match_top)[comp_younger] = static_cast<std::int32_t>(out.pairs.size());
            out.pairs.push_back({cell, younger});
        }
    }
    std::reverse(out.columns.begin(), out.columns.end());
}

// ---------------------------------------------------------------------------------
// Dimension 1 in 3D: boundary-matrix reduction of the squares.

inline void square_boundary(const Lattice& L, std::uint32_t cell, std::uint32_t out[4]) {
    const std::int64_t l = cell / 3;
    const int t = cell % 3;
    int u, w;
    other_axes(t, u, w);
    out[0] = static_cast<std::uint32_t>(3 * l + u);
    out[1] = static_cast<std::uint32_t>(3 * (l + L.stride[w]) + u);
    out[2] = static_cast<std::uint32_t>(3 * l + w);
    out[3] = static_cast<std::uint32_t>(3 * (l + L.stride[u]) + w);
}

// Long working columns of the reduction: a set of row positions with Z/2 toggling and
// "largest element" queries, as a 64-ary tree of bit words (each level marks the
// non-zero words of the level below). Toggle and max cost a few word operations
// whatever the column's length.
class BitTree {
  public:
    explicit BitTree(std::size_t n) {
        std::size_t m = std::max<std::size_t>(n, 1);
        do {
            m = (m + 63) / 64;
            levels_.emplace_back(m, 0);
        } while (m > 1);
    }
    void toggle(std::uint32_t i) {
        std::uint64_t idx = i;
        for (auto& level : levels_) {
            std::uint64_t& w = level[idx >> 6];
            const bool was = w != 0;
            w ^= 1ull << (idx & 63);
            if (was == (w != 0)) return;
            idx >>= 6;
        }
    }
    std::uint32_t max() const {
        if (levels_.back()[0] == 0) return kNone;
        std::uint64_t idx = 0;
        for (std::size_t l = levels_.size(); l-- > 0;) {
            const std::uint64_t w = levels_[l][idx];
            idx = idx * 64 + (63 - __builtin_clzll(w));
        }
        return static_cast<std::uint32_t>(idx);
    }

  private:
    std::vector<std::vector<std::uint64_t>> levels_;
};

// Reduces the columns (squares, in the given order) against the rows, the edges in the
// order `rows_sorted` (ascending keys of the row filtration); clearing has already
// removed every positive square, so all columns are expected to be non-zero.
// pivot[i] = the pivot edge (packed cell) of column i, or kNone for a zero column.
// Rows are handled by their position in rows_sorted, so a column is a set of 32-bit
// positions and its pivot is the largest position.
template <class Owner>
void reduce_dim1_impl(const Lattice& L, const std::vector<rank_t>& squares, const std::vector<key_t>& rows_sorted,
                      const std::vector<key_t>& columns, std::vector<std::uint32_t>& pivot) {
    const std::size_t ncols = columns.size();
    const std::size_t nrows = rows_sorted.size();
    pivot.assign(ncols, kNone);
    std::vector<std::uint32_t> pos(3 * L.points, kNone);
    for (std::size_t r = 0; r < nrows; ++r) pos[key_cell(rows_sorted[r])] = static_cast<std::uint32_t>(r);
    // What owns a row position (as a pivot), in one word so that the pivot lookup
    // also fetches the column to add: kFree, kRaw | square (the column is its boundary,
    // recomputed), or the offset of a stored reduced column in `arena` (length first).
    constexpr Owner kFree = ~Owner(0), kRaw = Owner(1) << (8 * sizeof(Owner) - 1);
    std::vector<Owner> owner(nrows, kFree);
    std::vector<std::uint32_t> arena;
    BitTree work(nrows);
    std::size_t st_reduced = 0, st_additions = 0;
    auto boundary = [&](std::uint32_t cell, std::uint32_t out[4]) {
        std::uint32_t edges[4];
        square_boundary(L, cell, edges);
        for (int q = 0; q < 4; ++q) out[q] = pos[edges[q]];
    };
    // Largest boundary position of every square, in one streaming pass in index order
    // (the column loop below visits squares in filtration order, i.e. at random; this
    // turns its four scattered lookups into one, which is prefetched).
    std::vector<std::uint32_t> raw_pivot(3 * L.points, 0);
    for (std::size_t c = 0; c < raw_pivot.size(); ++c) {
        if (squares[c] == kInfRank) continue;  // no such square
        std::uint32_t b[4];
        boundary(static_cast<std::uint32_t>(c), b);
        raw_pivot[c] = std::max(std::max(b[0], b[1]), std::max(b[2], b[3]));
    }
    // The working column is a descending vector while it is short (adding a column is
    // a merge with Z/2 cancellation, in L1); a long one moves to the bit tree.
    constexpr std::size_t kShort = 1024;
    std::vector<std::uint32_t> wv, tmp;
    auto sort4_desc = [](std::uint32_t v[4]) {
        auto cs = [&](int a, int b) {
            if (v[a] < v[b]) std::swap(v[a], v[b]);
        };
        cs(0, 1), cs(2, 3), cs(0, 2), cs(1, 3), cs(1, 2);
    };
    auto merge_into = [&](const std::uint32_t* c, std::size_t n) {
        tmp.clear();
        std::size_t a = 0, b = 0;
        while (a < wv.size() && b < n) {
            if (wv[a] > c[b]) tmp.push_back(wv[a++]);
            else if (c[b] > wv[a]) tmp.push_back(c[b++]);
            else ++a, ++b;
        }
        tmp.insert(tmp.end(), wv.begin() + a, wv.end());
        tmp.insert(tmp.end(), c + b, c + n);
        wv.swap(tmp);
    };
    constexpr std::size_t kAhead = 16;
    for (std::size_t i = 0; i < ncols; ++i) {
        if (i + 2 * kAhead < ncols) __builtin_prefetch(&raw_pivot[key_cell(columns[i + 2 * kAhead])]);
        if (i + kAhead < ncols) __builtin_prefetch(&owner[raw_pivot[key_cell(columns[i + kAhead])]]);
        const std::uint32_t cell = key_cell(columns[i]);
        std::uint32_t p = raw_pivot[cell];
        if (owner[p] == kFree) {  // apparent pivot: the column is reduced as it is
            owner[p] = kRaw | cell;
            pivot[i] = p;
            continue;
        }
        ++st_reduced;
        std::uint32_t b[4];
        boundary(cell, b);
        sort4_desc(b);
        wv.assign(b, b + 4);
        bool in_tree = false;
        for (;;) {
            const Owner o = owner[p];
            ++st_additions;
            const std::uint32_t* col;
            std::size_t n;
            std::uint32_t other[4];
            if (o & kRaw) {
                boundary(static_cast<std::uint32_t>(o & ~kRaw), other);
                sort4_desc(other);
                col = other;
                n = 4;
            } else {
                col = arena.data() + o + 1;
                n = arena[o];
            }
            if (!in_tree && wv.size() + n > kShort) {
                for (std::uint32_t q : wv) work.toggle(q);
                in_tree = true;
            }
            if (in_tree) {
                for (std::size_t q = 0; q < n; ++q) work.toggle(col[q]);
                p = work.max();
            } else {
                merge_into(col, n);
                p = wv.empty() ? kNone : wv[0];
            }
            if (p == kNone) break;  // zero column
            if (owner[p] == kFree) {
                pivot[i] = p;
                if (arena.size() >= kRaw) throw std::length_error("reduction too large for the engine");
                owner[p] = static_cast<Owner>(arena.size());
                arena.push_back(0);
                if (in_tree) {
                    for (std::uint32_t q = work.max(); q != kNone; q = work.max()) {
                        arena.push_back(q);
                        work.toggle(q);
                    }
                } else {
                    arena.insert(arena.end(), wv.begin(), wv.end());
                }
                arena[owner[p]] = static_cast<std::uint32_t>(arena.size() - owner[p] - 1);
                break;
            }
        }
    }
    for (auto& p : pivot)
        if (p != kNone) p = key_cell(rows_sorted[p]);
    if (std::getenv("MEDSEG_TOPOLOGY_PROFILE"))
        std::fprintf(stderr, "  reduce: %zu columns, %zu reduced, %zu additions, stored entries %zu\n", ncols,
                     st_reduced, st_additions, arena.size());
}

// 32-bit owner words (half the cache footprint) whenever the cells fit in 31 bits.
void reduce_dim1(const Lattice& L, const std::vector<rank_t>& squares, const std::vector<key_t>& rows_sorted,
                 const std::vector<key_t>& columns, std::vector<std::uint32_t>& pivot) {
    if (3 * L.points < (std::int64_t(1) << 31)) {
        try {
            return reduce_dim1_impl<std::uint32_t>(L, squares, rows_sorted, columns, pivot);
        } catch (const std::length_error&) {  // more than 2^31 stored entries: retry wide
        }
    }
    reduce_dim1_impl<std::uint64_t>(L, squares, rows_sorted, columns, pivot);
}

// ---------------------------------------------------------------------------------
// Dimension 0: union-find with the elder rule.

struct Dim0 {
    std::vector<CellPair> pairs;               // birth vertex, death edge
    std::vector<std::int32_t> pair_of_birth;   // vertex -> index in pairs, or -1
};

void dimension0(const Filtration& X, const std::vector<key_t>& edges, Dim0& out) {
    const Lattice& L = X.L;
    UnionFind uf(L.points);
    out.pair_of_birth.assign(L.points, -1);
    for (key_t key : edges) {
        const std::uint32_t cell = key_cell(key);
        const std::uint32_t a = cell / 3, b = static_cast<std::uint32_t>(a + L.stride[cell % 3]);
        const std::uint32_t ra = uf.find(a), rb = uf.find(b);
        if (ra == rb) continue;
        const bool a_younger = X.vkey(ra) > X.vkey(rb);
        const std::uint32_t younger = a_younger ? ra : rb;
        uf.parent[younger] = a_younger ? rb : ra;
        if (X.v[younger] != key_rank(key)) {
            out.pair_of_birth[younger] = static_cast<std::int32_t>(out.pairs.size());
            out.pairs.push_back({younger, cell});
        }
    }
}

// The comparison's union-find, carrying the elders of X0 and X1 along (their forests
// have the same partition as the comparison's at every step). For every non-trivial
// comparison pair, the X0- and X1-younger vertices are returned.
void dimension0_image(const Filtration& C, const Filtration& X0, const Filtration& X1,
                      const std::vector<key_t>& edges,
                      std::vector<std::pair<std::uint32_t, std::uint32_t>>& image_births) {
    const Lattice& L = C.L;
    UnionFind uf(L.points);
    std::vector<std::uint32_t> lab0(L.points), lab1(L.points);
    std::iota(lab0.begin(), lab0.end(), 0u);
    std::iota(lab1.begin(), lab1.end(), 0u);
    for (key_t key : edges) {
        const std::uint32_t cell = key_cell(key);
        const std::uint32_t a = cell / 3, b = static_cast<std::uint32_t>(a + L.stride[cell % 3]);
        const std::uint32_t ra = uf.find(a), rb = uf.find(b);
        if (ra == rb) continue;
        const bool a_younger = C.vkey(ra) > C.vkey(rb);
        const std::uint32_t younger = a_younger ? ra : rb, elder = a_younger ? rb : ra;
        uf.parent[younger] = elder;
        const std::uint32_t x0a = lab0[ra], x0b = lab0[rb];
        const bool x0a_younger = X0.vkey(x0a) > X0.vkey(x0b);
        lab0[elder] = x0a_younger ? x0b : x0a;
        const std::uint32_t x1a = lab1[ra], x1b = lab1[rb];
        const bool x1a_younger = X1.vkey(x1a) > X1.vkey(x1b);
        lab1[elder] = x1a_younger ? x1b : x1a;
        if (C.v[younger] != key_rank(key))
            image_births.emplace_back(x0a_younger ? x0a : x0b, x1a_younger ? x1a : x1b);
    }
}

// ---------------------------------------------------------------------------------
// Per-image work shared by barcodes and matchings

struct Complex {
    Filtration F;
    std::vector<key_t> edges;    // sorted
    std::vector<key_t> subs;     // sorted (d-1)-cells (3D only; in 2D these are the edges)
    TopDim top;
    std::vector<std::uint32_t> pivot1;  // 3D: pivot edge of each column of top.columns
    std::vector<CellPair> pairs1;       // 3D: (edge, square)
    std::vector<std::int32_t> pair1_of_birth;  // 3D: edge -> index in pairs1
    std::vector<std::uint32_t> pair1_column;   // 3D: column index of each pair
    Dim0 dim0;
};

void check_size(const Lattice& L) {
    if (L.points > kMaxPoints)
        throw std::length_error("image too large for the engine: " + std::to_string(L.points) +
                                " lattice points, at most " + std::to_string(kMaxPoints));
}

Lattice image_lattice(const ImageView& im) {
    if (im.ndim == 2) return Lattice(2, im.shape[0], im.shape[1], 1);
    return Lattice(3, im.shape[0], im.shape[1], im.shape[2]);
}

void make_filtration(Filtration& F, const Lattice& pixels, std::vector<rank_t>&& ranks,
                     rank_t num_ranks, Construction construction) {
    F.construction = construction;
    F.num_ranks = num_ranks;
    if (construction == Construction::V) {
        F.L = pixels;
        F.v = std::move(ranks);
        build_edges_faces_cubes_V(F);
    } else {
        F.pixels = pixels;
        F.pix = std::move(ranks);
        if (pixels.ndim == 2) F.L = Lattice(2, pixels.n[0] + 1, pixels.n[1] + 1, 1);
        else F.L = Lattice(3, pixels.n[0] + 1, pixels.n[1] + 1, pixels.n[2] + 1);
        check_size(F.L);
        build_T(F);
    }
}

void sort_cells(Complex& X) {
    X.edges = sorted_keys(X.F.e, X.F.num_ranks);
    if (X.F.dim() == 3) X.subs = sorted_keys(X.F.f, X.F.num_ranks);
}

const std::vector<key_t>& sub_cells(const Complex& X) { return X.F.dim() == 3 ? X.subs : X.edges; }

void own_dim1(Complex& X) {
    reduce_dim1(X.F.L, X.F.f, X.edges, X.top.columns, X.pivot1);
    X.pair1_of_birth.assign(3 * X.F.L.points, -1);
    for (std::size_t i = 0; i < X.top.columns.size(); ++i) {
        const std::uint32_t p = X.pivot1[i];
        if (p == kNone) continue;
        if (X.F.e[p] != key_rank(X.top.columns[i])) {
            X.pair1_of_birth[p] = static_cast<std::int32_t>(X.pairs1.size());
            X.pairs1.push_back({p, key_cell(X.top.columns[i])});
            X.pair1_column.push_back(static_cast<std::uint32_t>(i));
        }
    }
    std::vector<std::uint32_t>().swap(X.pivot1);
}

// Top cells are numbered by their base point; in 2D they are squares with normal z.
std::uint64_t top_packed(int d, std::uint32_t lin) { return d == 3 ? lin : 3ull * lin + 2; }

void append(VoxelPairs& vp, const Reporter& rep, int ndim, int kb, std::uint64_t birth, int kd,
            std::uint64_t death) {
    std::int64_t c[3];
    rep.report(kb, birth, c);
    vp.birth.insert(vp.birth.end(), c, c + ndim);
    rep.report(kd, death, c);
    vp.death.insert(vp.death.end(), c, c + ndim);
}

// Dense ranks of one image (float32 stays float32).
rank_t rank_image(const ImageView& im, std::int64_t n, bool superlevel, std::vector<rank_t>& out) {
    std::vector<std::vector<rank_t>> ranks;
    rank_t num;
    if (im.dtype == DType::Float32)
        num = dense_ranks<float>({static_cast<const float*>(im.data)}, n, ranks, superlevel);
    else
        num = dense_ranks<double>({static_cast<const double*>(im.data)}, n, ranks, superlevel);
    out = std::move(ranks[0]);
    return num;
}

template <class T>
void union_values(const T* a, const T* b, std::int64_t n, bool take_max, std::vector<T>& out) {
    out.resize(n);
    if (take_max)
        for (std::int64_t i = 0; i < n; ++i) out[i] = std::max(a[i], b[i]);
    else
        for (std::int64_t i = 0; i < n; ++i) out[i] = std::min(a[i], b[i]);
}

// Ranks of the comparison image: the union of the two filtrations (the elementwise
// value that enters first) or their intersection (the one that enters last).
rank_t rank_comparison(const ImageView& a, const ImageView& b, std::int64_t n, bool superlevel,
                       bool intersection, std::vector<rank_t>& out) {
    if (a.dtype != b.dtype) throw std::invalid_argument("both images must have the same dtype");
    const bool take_max = superlevel != intersection;
    ImageView c = a;
    if (a.dtype == DType::Float32) {
        std::vector<float> v;
        union_values(static_cast<const float*>(a.data), static_cast<const float*>(b.data), n, take_max, v);
        c.data = v.data();
        return rank_image(c, n, superlevel, out);
    }
    std::vector<double> v;
    union_values(static_cast<const double*>(a.data), static_cast<const double*>(b.data), n, take_max, v);
    c.data = v.data();
    return rank_image(c, n, superlevel, out);
}

// Everything about one image that does not depend on the other image of a matching:
// its filtration, sorted cells and its own barcode.
void prepare_complex(Complex& X, const Lattice& P, const ImageView& im, const Options& opt) {
    std::vector<rank_t> r;
    const rank_t num = rank_image(im, P.points, opt.superlevel, r);
    make_filtration(X.F, P, std::move(r), num, opt.construction);
    sort_cells(X);
    const int d = X.F.dim();
    top_dimension(X.F, sub_cells(X), nullptr, nullptr, X.top, d == 3);
    if (d == 3) own_dim1(X);
    dimension0(X.F, X.edges, X.dim0);
}

// Intersection comparison H: now H is contained in X at every step, so the roles of
// the union case swap: X's own order is walked (codomain) carrying H's elders
// (domain). For every non-trivial pair of X, in the order of X.dim0.pairs, the index of
// the H pair born at the H-younger vertex (or -1).
std::vector<std::int32_t> dimension0_into(const Filtration& X, const std::vector<key_t>& edges,
                                          const Filtration& H, const Dim0& h0) {
    const Lattice& L = X.L;
    UnionFind uf(L.points);
    std::vector<std::uint32_t> lab(L.points);
    std::iota(lab.begin(), lab.end(), 0u);
    std::vector<std::int32_t> out;
    for (key_t key : edges) {
        const std::uint32_t cell = key_cell(key);
        const std::uint32_t a = cell / 3, b = static_cast<std::uint32_t>(a + L.stride[cell % 3]);
        const std::uint32_t ra = uf.find(a), rb = uf.find(b);
        if (ra == rb) continue;
        const bool a_younger = X.vkey(ra) > X.vkey(rb);
        const std::uint32_t younger = a_younger ? ra : rb, elder = a_younger ? rb : ra;
        uf.parent[younger] = elder;
        const std::uint32_t ha = lab[ra], hb = lab[rb];
        const bool ha_younger = H.vkey(ha) > H.vkey(hb);
        lab[elder] = ha_younger ? hb : ha;
        if (X.v[younger] != key_rank(key)) out.push_back(h0.pair_of_birth[ha_younger ? ha : hb]);
    }
    return out;
}

// Pairs of X matched to pairs of H through the image of H -> X (intersection), per
// dimension: out[k][i] = index of the H pair matched with X's i-th pair, or -1.
std::vector<std::vector<std::int32_t>> into_comparison(const Complex& X, const Complex& H) {
    const int d = X.F.dim();
    std::vector<std::vector<std::int32_t>> out(d);
    out[0] = dimension0_into(X.F, X.edges, H.F, H.dim0);
    if (d == 3) {
        std::vector<std::uint32_t> pivot;
        reduce_dim1(X.F.L, X.F.f, H.edges, X.top.columns, pivot);
        for (std::size_t q = 0; q < X.pairs1.size(); ++q) {
            const std::uint32_t e = pivot[X.pair1_column[q]];
            out[1].push_back(e == kNone ? -1 : H.pair1_of_birth[e]);
        }
    }
    std::vector<std::int32_t> match_top;
    TopDim unused;
    top_dimension(H.F, sub_cells(H), &X.F, &match_top, unused, false);
    for (const CellPair& p : X.top.pairs) out[d - 1].push_back(match_top[p.death_cell]);
    return out;
}

// Voxel coordinates of matched and unmatched pairs; matches[k] holds (index in a's
// pairs, index in b's pairs) of dimension k.
MatchingResult assemble(const Complex& X0, const Complex& X1,
                        const std::vector<std::vector<std::pair<std::int32_t, std::int32_t>>>& matches,
                        const Options& opt) {
    const int d = X0.F.dim();
    MatchingResult res;
    res.ndim = d;
    res.matched_a.resize(d);
    res.matched_b.resize(d);
    res.unmatched_a.resize(d);
    res.unmatched_b.resize(d);
    res.num_unmatched_a.assign(d, 0);
    res.num_unmatched_b.assign(d, 0);
    Reporter rep0{X0.F}, rep1{X1.F};
    auto death = [d](int k, const CellPair& p) -> std::uint64_t {
        return k == d - 1 ? top_packed(d, p.death_cell) : p.death_cell;
    };
    for (int k = 0; k < d; ++k) {
        const std::vector<CellPair>& p0 = (k == 0) ? X0.dim0.pairs : (k == d - 1) ? X0.top.pairs : X0.pairs1;
        const std::vector<CellPair>& p1 = (k == 0) ? X1.dim0.pairs : (k == d - 1) ? X1.top.pairs : X1.pairs1;
        std::vector<char> used0(p0.size(), 0), used1(p1.size(), 0);
        for (const auto& [i0, i1] : matches[k]) {
            used0[i0] = used1[i1] = 1;
            append(res.matched_a[k], rep0, d, k, p0[i0].birth_cell, k + 1, death(k, p0[i0]));
            append(res.matched_b[k], rep1, d, k, p1[i1].birth_cell, k + 1, death(k, p1[i1]));
        }
        res.num_unmatched_a[k] = static_cast<std::int64_t>(p0.size() - matches[k].size());
        res.num_unmatched_b[k] = static_cast<std::int64_t>(p1.size() - matches[k].size());
        if (opt.include_unmatched_a)
            for (std::size_t i = 0; i < p0.size(); ++i)
                if (!used0[i]) append(res.unmatched_a[k], rep0, d, k, p0[i].birth_cell, k + 1, death(k, p0[i]));
        if (opt.include_unmatched_b)
            for (std::size_t i = 0; i < p1.size(); ++i)
                if (!used1[i]) append(res.unmatched_b[k], rep1, d, k, p1[i].birth_cell, k + 1, death(k, p1[i]));
    }
    return res;
}

}  // namespace

struct PreparedImage {
    Complex X;
    Options options;
    std::int64_t shape[3] = {1, 1, 1};
    int ndim = 0;
};

std::shared_ptr<const PreparedImage> prepare_image(const ImageView& image, const Options& opt) {
    const Lattice P = image_lattice(image);
    check_size(P);
    auto prep = std::make_shared<PreparedImage>();
    prepare_complex(prep->X, P, image, opt);
    prep->options = opt;
    prep->ndim = image.ndim;
    for (int a = 0; a < 3; ++a) prep->shape[a] = image.shape[a];
    return prep;
}

std::size_t prepared_bytes(const PreparedImage& p) {
    const Complex& X = p.X;
    auto sz = [](const auto& v) { return v.capacity() * sizeof(v[0]); };
    return sz(X.F.v) + sz(X.F.e) + sz(X.F.f) + sz(X.F.c) + sz(X.F.pix) + sz(X.edges) + sz(X.subs) +
           sz(X.top.pairs) + sz(X.pairs1) + sz(X.pair1_of_birth) + sz(X.pair1_column) + sz(X.dim0.pairs) +
           sz(X.dim0.pair_of_birth) + sizeof(PreparedImage);
}

// ---------------------------------------------------------------------------------

BarcodeResult compute_barcode(const ImageView& image, const Options& opt) {
    const Lattice P = image_lattice(image);
    check_size(P);
    Complex X;
    prepare_complex(X, P, image, opt);
    const int d = X.F.dim();

    BarcodeResult res;
    res.ndim = d;
    res.pairs.resize(d);
    Reporter rep{X.F};
    for (const CellPair& p : X.dim0.pairs) append(res.pairs[0], rep, d, 0, p.birth_cell, 1, p.death_cell);
    if (d == 3)
        for (const CellPair& p : X.pairs1) append(res.pairs[1], rep, d, 1, p.birth_cell, 2, p.death_cell);
    for (const CellPair& p : X.top.pairs)
        append(res.pairs[d - 1], rep, d, d - 1, p.birth_cell, d, top_packed(d, p.death_cell));
    std::uint32_t best = 0;
    for (std::uint32_t l = 1; l < X.F.L.points; ++l)
        if (X.F.vkey(l) < X.F.vkey(best)) best = l;
    std::int64_t c[3];
    rep.report(0, best, c);
    res.essential_birth.assign(c, c + d);
    return res;
}

MatchingResult compute_matching(const ImageView& a, const ImageView& b, const Options& opt,
                                const PreparedImage* prepared_b) {
    const Lattice P = image_lattice(a);
    check_size(P);
    if (prepared_b) {
        const Options& po = prepared_b->options;
        if (po.superlevel != opt.superlevel || po.construction != opt.construction ||
            prepared_b->ndim != a.ndim || !std::equal(a.shape, a.shape + 3, prepared_b->shape))
            throw std::invalid_argument("prepared target does not fit this prediction or these options");
    }
    PhaseTimer timer;
    const int threads = std::max(1, opt.threads);
    Complex X0, C, X1_local;
    const Complex& X1 = prepared_b ? prepared_b->X : X1_local;
    std::vector<std::vector<std::pair<std::int32_t, std::int32_t>>> matches;
    if (opt.intersection) {
        // Every image has its own barcode; a and b are matched when they are matched
        // with the same pair of the intersection.
        Complex H;
        std::vector<std::function<void()>> tasks = {
            [&] {
                std::vector<rank_t> r;
                const rank_t num = rank_comparison(a, b, P.points, opt.superlevel, true, r);
                make_filtration(H.F, P, std::move(r), num, opt.construction);
                sort_cells(H);
                top_dimension(H.F, sub_cells(H), nullptr, nullptr, H.top, H.F.dim() == 3);
                if (H.F.dim() == 3) own_dim1(H);
                dimension0(H.F, H.edges, H.dim0);
            },
            [&] { prepare_complex(X0, P, a, opt); },
        };
        if (!prepared_b) tasks.push_back([&] { prepare_complex(X1_local, P, b, opt); });
        run_tasks(tasks, threads);
        std::vector<std::vector<std::int32_t>> to_h0, to_h1;
        std::vector<std::function<void()>> more = {
            [&] { to_h0 = into_comparison(X0, H); },
            [&] { to_h1 = into_comparison(X1, H); },
        };
        run_tasks(more, threads);
        const int d = X0.F.dim();
        matches.resize(d);
        for (int k = 0; k < d; ++k) {
            const std::size_t nh = k == 0 ? H.dim0.pairs.size() : k == d - 1 ? H.top.pairs.size() : H.pairs1.size();
            std::vector<std::int32_t> b_of_h(nh, -1);
            for (std::size_t j = 0; j < to_h1[k].size(); ++j)
                if (to_h1[k][j] >= 0) b_of_h[to_h1[k][j]] = static_cast<std::int32_t>(j);
            for (std::size_t i = 0; i < to_h0[k].size(); ++i)
                if (to_h0[k][i] >= 0 && b_of_h[to_h0[k][i]] >= 0)
                    matches[k].emplace_back(static_cast<std::int32_t>(i), b_of_h[to_h0[k][i]]);
        }
        return assemble(X0, X1, matches, opt);
    }
    {
        std::vector<std::function<void()>> tasks;
        // The target's own barcode is independent of the prediction (and cacheable).
        if (!prepared_b) tasks.push_back([&] { prepare_complex(X1_local, P, b, opt); });
        std::vector<std::function<void()>> more = {
            [&] {
                std::vector<rank_t> r;
                const rank_t num = rank_image(a, P.points, opt.superlevel, r);
                make_filtration(X0.F, P, std::move(r), num, opt.construction);
                sort_cells(X0);
            },
            [&] {
                std::vector<rank_t> r;
                const rank_t num = rank_comparison(a, b, P.points, opt.superlevel, false, r);
                make_filtration(C.F, P, std::move(r), num, opt.construction);
                sort_cells(C);
            },
        };
        tasks.insert(tasks.end(), more.begin(), more.end());
        run_tasks(tasks, threads);
    }
    timer.mark("ranks + cells + sort");
    const int d = X0.F.dim();
    std::vector<std::int32_t> match_top0, match_top1;
    TopDim top1;  // the target's pairs again, now with the comparison's labels
    {
        std::vector<std::function<void()>> tasks = {
            [&] { top_dimension(X0.F, sub_cells(X0), &C.F, &match_top0, X0.top, d == 3); },
            [&] { top_dimension(X1.F, sub_cells(X1), &C.F, &match_top1, top1, false); },
            [&] { top_dimension(C.F, sub_cells(C), nullptr, nullptr, C.top, d == 3); },
        };
        run_tasks(tasks, threads);
    }
    timer.mark("top dimension");
    std::vector<std::uint32_t> image_pivot0, image_pivot1;
    std::vector<std::pair<std::uint32_t, std::uint32_t>> image_births0;
    {
        std::vector<std::function<void()>> tasks;
        if (d == 3) {  // longest first: the image reductions
            tasks.push_back([&] { reduce_dim1(C.F.L, C.F.f, X0.edges, C.top.columns, image_pivot0); });
            tasks.push_back([&] { reduce_dim1(C.F.L, C.F.f, X1.edges, C.top.columns, image_pivot1); });
            tasks.push_back([&] { own_dim1(X0); });
            tasks.push_back([&] { own_dim1(C); });
        }
        tasks.push_back([&] { dimension0(X0.F, X0.edges, X0.dim0); });
        tasks.push_back([&] { dimension0_image(C.F, X0.F, X1.F, C.edges, image_births0); });
        if (timer.on) {  // time the tasks one by one
            const char* names[] = {"dim1 image a", "dim1 image b", "dim1 a", "dim1 comparison", "dim0 a",
                                   "dim0 comparison+images"};
            const std::size_t skip = d == 3 ? 0 : 4;
            for (std::size_t q = 0; q < tasks.size(); ++q) {
                tasks[q]();
                timer.mark(names[q + skip]);
            }
        } else {
            run_tasks(tasks, threads);
        }
    }

    // Matchings per dimension: (index in X0's pairs, index in X1's pairs).
    matches.resize(d);
    for (auto& [y0, y1] : image_births0) {
        const std::int32_t i0 = X0.dim0.pair_of_birth[y0], i1 = X1.dim0.pair_of_birth[y1];
        if (i0 >= 0 && i1 >= 0) matches[0].emplace_back(i0, i1);
    }
    if (d == 3) {
        for (std::size_t q = 0; q < C.pairs1.size(); ++q) {
            const std::uint32_t col = C.pair1_column[q];
            const std::uint32_t e0 = image_pivot0[col], e1 = image_pivot1[col];
            if (e0 == kNone || e1 == kNone) continue;
            const std::int32_t i0 = X0.pair1_of_birth[e0], i1 = X1.pair1_of_birth[e1];
            if (i0 >= 0 && i1 >= 0) matches[1].emplace_back(i0, i1);
        }
    }
    for (const CellPair& p : C.top.pairs) {
        const std::int32_t i0 = match_top0[p.death_cell], i1 = match_top1[p.death_cell];
        if (i0 >= 0 && i1 >= 0) matches[d - 1].emplace_back(i0, i1);
    }

    MatchingResult res = assemble(X0, X1, matches, opt);
    timer.mark("matching + coordinates");
    return res;
}

}  // namespace medseg
