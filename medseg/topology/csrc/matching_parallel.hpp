// Betti matching (union or intersection comparison) on the data-parallel backend,
// written once for CPU threads and CUDA like spanning.hpp. Same MatchingResult as
// engine.cpp's compute_matching, bit for bit: same pairs, matches, order and voxels.
//
// Per pair (a, b) and comparison c = elementwise max/min of a and b:
//   * dimension 0: minimum spanning forests of a, b, c (device); a's and b's elder rule
//     and c's union-find carrying a's and b's elders run over forest edges only (host).
//   * dimension d-1: maximum spanning forests of the dual graphs (device); a's and b's
//     elder rule carry c's labels (engine.cpp's top_dimension with comp), c's runs on
//     its own (host, forest edges only).
//   * dimension 1 in 3D: the five column reductions of engine.cpp (a, b, c on their
//     own; c's columns against a's and b's rows). Columns are the squares outside the
//     column complex's dual forest (clearing, Chen-Kerber 2011: the forest's squares
//     are exactly the positive ones, which create voids and reduce to zero).
//     Apparent pairs are screened in parallel: a column s whose largest boundary edge e
//     (row order) has s as the first column in column order among all columns
//     containing e is reduced as it stands and owns e (no earlier column contains e,
//     so none can reach pivot e; Bauer, "Ripser", J. Appl. Comput. Topol. 2021, with
//     separate row and column orders as in image persistence, Bauer-Schmahl, SoCG 2023). The
//     rest are reduced on the host, left to right, with those owners pre-filled. The
//     pivot of every column of a left-to-right reduction is unique (the "low" of
//     R = D V, V upper unitriangular), so any correct reduction gives the engine's pivots.
//   * intersection: c is contained in a and b, so the roles swap (engine.cpp's
//     into_comparison): a's and b's own passes carry c's elders (dimension 0), c's
//     dual pass carries a's / b's labels (d-1), and a's / b's columns are reduced
//     against c's rows (dimension 1); a and b match through the same pair of c.
//   * coordinates: CellReporter where the filtration lives; only coordinates return.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "spanning.hpp"

namespace medseg {
namespace par {

// The 4 edges of a square (engine.cpp's square_boundary).
MEDSEG_HD inline void square_edges(const Lattice& L, std::uint32_t cell, std::uint32_t out[4]) {
    const std::int64_t l = cell / 3;
    int u, w;
    other_axes_hd(static_cast<int>(cell % 3), u, w);
    out[0] = static_cast<std::uint32_t>(3 * l + u);
    out[1] = static_cast<std::uint32_t>(3 * (l + L.stride[w]) + u);
    out[2] = static_cast<std::uint32_t>(3 * l + w);
    out[3] = static_cast<std::uint32_t>(3 * (l + L.stride[u]) + w);
}

// Columns of a complex's dimension-1 reduction: existing squares outside its dual forest.
struct ColumnKeys {
    const rank_t* f;
    const std::uint32_t* cleared;
    std::uint64_t* key;
    std::uint32_t* flag;
    MEDSEG_HD void operator()(std::size_t s) const {
        const bool col = f[s] != kInfRank && !cleared[s];
        flag[s] = col ? 1u : 0u;
        key[s] = col ? make_key(f[s], s) : kNoKey;
    }
};

// Every column offers its key to its 4 edges (atomic min: the first column containing
// the edge) and records its raw pivot, the largest edge in row order.
struct OfferColumns {
    Lattice L;
    const rank_t* colf;
    const std::uint32_t* cleared;
    const rank_t* rowe;
    std::uint32_t* raw_pivot;
    std::uint64_t* first;
    MEDSEG_HD void operator()(std::size_t s) const {
        if (colf[s] == kInfRank || cleared[s]) return;
        std::uint32_t e[4];
        square_edges(L, static_cast<std::uint32_t>(s), e);
        std::uint32_t best = e[0];
        for (int q = 1; q < 4; ++q)
            if (make_key(rowe[e[q]], e[q]) > make_key(rowe[best], best)) best = e[q];
        raw_pivot[s] = best;
        const std::uint64_t k = make_key(colf[s], s);
        for (int q = 0; q < 4; ++q) atomic_min_u64(&first[e[q]], k);
    }
};

// Column i (sorted) is apparent iff it is the first column containing its raw pivot:
// out[i] = that pivot edge, else kNone.
struct ApparentPivots {
    const std::uint64_t* cols;
    const std::uint32_t* raw_pivot;
    const std::uint64_t* first;
    std::uint32_t* out;
    MEDSEG_HD void operator()(std::size_t i) const {
        const std::uint32_t e = raw_pivot[key_cell(cols[i])];
        out[i] = first[e] == cols[i] ? e : kNone;
    }
};

// Rows of a complex's dimension-1 reductions: its edges in key order, and each edge's
// position in that order.
struct EdgeKeys {
    const rank_t* e;
    std::uint64_t* key;
    std::uint32_t* flag;
    MEDSEG_HD void operator()(std::size_t i) const {
        const bool ok = e[i] != kInfRank;
        flag[i] = ok ? 1u : 0u;
        key[i] = ok ? make_key(e[i], i) : kNoKey;
    }
};
struct RowPositions {
    const std::uint64_t* rows;
    std::uint32_t* pos;
    MEDSEG_HD void operator()(std::size_t i) const { pos[key_cell(rows[i])] = static_cast<std::uint32_t>(i); }
};

// Long working columns: a set of row positions with Z/2 toggling and "largest element"
// queries, a 64-ary tree of bit words (each level marks the non-zero words of the level
// below; engine.cpp's BitTree, reimplemented here as that one is private to it).
class BitSetTree {
  public:
    explicit BitSetTree(std::size_t n) {
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
        for (std::size_t l = levels_.size(); l-- > 0;) idx = idx * 64 + (63 - __builtin_clzll(levels_[l][idx]));
        return static_cast<std::uint32_t>(idx);
    }

  private:
    std::vector<std::vector<std::uint64_t>> levels_;
};

// Host: the left-to-right reduction (Z/2) of the columns that are not apparent, rows
// by their position in row order (pos: edge -> position, rows: the row keys in order).
// The owner of every apparent pivot is filled in first. A working column is a short
// descending vector, moved to a BitSetTree when it grows long; a reduced column is
// stored only when it differs from its boundary. pivot[i] = the pivot edge of column
// i, or kNone for a zero column (engine.cpp's reduce_dim1 output).
inline std::vector<std::uint32_t> reduce_remaining(const Lattice& L, const std::vector<key_t>& cols,
                                                   const std::vector<std::uint32_t>& apparent,
                                                   const std::vector<std::uint32_t>& pos,
                                                   const std::vector<key_t>& rows, std::size_t* reduced = nullptr) {
    const std::size_t n = cols.size();
    constexpr std::size_t kShort = 128;  // longer columns go to the tree (tie-heavy inputs: ~2x faster than 1024)
    // What owns a row position, in one word (as in engine.cpp): kFree, kRaw | square
    // (the column is its boundary) or the offset of a stored column in `arena`.
    constexpr std::uint64_t kFree = ~std::uint64_t(0), kRaw = std::uint64_t(1) << 63;
    std::vector<std::uint32_t> pivot(n, kNone);
    std::vector<std::uint64_t> owner(rows.size(), kFree);
    for (std::size_t i = 0; i < n; ++i)
        if (apparent[i] != kNone) {
            owner[pos[apparent[i]]] = kRaw | key_cell(cols[i]);
            pivot[i] = apparent[i];
        }
    std::vector<std::uint32_t> arena, wv, tmp;
    std::unique_ptr<BitSetTree> tree;
    auto boundary = [&](std::uint32_t square, std::uint32_t out[4]) {
        std::uint32_t e[4];
        square_edges(L, square, e);
        for (int q = 0; q < 4; ++q) out[q] = pos[e[q]];
        std::sort(out, out + 4, [](std::uint32_t x, std::uint32_t y) { return x > y; });
    };
    std::size_t count = 0;
    for (std::size_t i = 0; i < n; ++i) {
        if (apparent[i] != kNone) continue;
        ++count;
        const std::uint32_t cell = key_cell(cols[i]);
        std::uint32_t b[4];
        boundary(cell, b);
        std::uint32_t p = b[0];
        if (owner[p] == kFree) {  // pivot free when reached: reduced as it stands
            owner[p] = kRaw | cell;
            pivot[i] = key_cell(rows[p]);
            continue;
        }
        wv.assign(b, b + 4);
        bool in_tree = false;
        for (;;) {
            const std::uint64_t o = owner[p];
            std::uint32_t other[4];
            const std::uint32_t* c;
            std::size_t m;
            if (o & kRaw) {
                boundary(static_cast<std::uint32_t>(o & ~kRaw), other);
                c = other;
                m = 4;
            } else {
                c = arena.data() + o + 1;
                m = arena[o];
            }
            if (!in_tree && wv.size() + m > kShort) {
                if (!tree) tree = std::make_unique<BitSetTree>(rows.size());
                for (std::uint32_t q : wv) tree->toggle(q);
                in_tree = true;
            }
            if (in_tree) {
                for (std::size_t q = 0; q < m; ++q) tree->toggle(c[q]);
                p = tree->max();
            } else {
                tmp.clear();  // merge, equal entries cancel
                std::size_t x = 0, y = 0;
                while (x < wv.size() && y < m) {
                    if (wv[x] > c[y]) tmp.push_back(wv[x++]);
                    else if (c[y] > wv[x]) tmp.push_back(c[y++]);
                    else ++x, ++y;
                }
                tmp.insert(tmp.end(), wv.begin() + x, wv.end());
                tmp.insert(tmp.end(), c + y, c + m);
                wv.swap(tmp);
                p = wv.empty() ? kNone : wv[0];
            }
            if (p == kNone) break;  // zero column (the tree is empty again)
            if (owner[p] == kFree) {
                pivot[i] = key_cell(rows[p]);
                owner[p] = arena.size();
                const std::size_t at = arena.size();
                arena.push_back(0);
                if (in_tree) {
                    for (std::uint32_t q = tree->max(); q != kNone; q = tree->max()) {
                        arena.push_back(q);
                        tree->toggle(q);
                    }
                } else {
                    arena.insert(arena.end(), wv.begin(), wv.end());
                }
                arena[at] = static_cast<std::uint32_t>(arena.size() - at - 1);
                break;
            }
        }
    }
    if (reduced) *reduced = count;
    return pivot;
}

// Runs the tasks on up to `threads` std::threads (host work only).
template <class Task>
void run_host_tasks(std::vector<Task>& tasks, int threads) {
    if (threads <= 1 || tasks.size() <= 1) {
        for (auto& t : tasks) t();
        return;
    }
    std::vector<std::thread> pool;
    const std::size_t k = std::min<std::size_t>(static_cast<std::size_t>(threads), tasks.size());
    for (std::size_t w = 1; w < k; ++w)
        pool.emplace_back([&, w] {
            for (std::size_t i = w; i < tasks.size(); i += k) tasks[i]();
        });
    for (std::size_t i = 0; i < tasks.size(); i += k) tasks[i]();
    for (auto& t : pool) t.join();
}

// One complex of the matching: its filtration (where Exec computes) and its host-side
// pieces.
template <class Exec>
struct MatchComplex {
    ParallelBarcode<Exec> pb;
    std::vector<rank_t> v;               // vertex ranks
    std::vector<std::uint64_t> forest0;  // ascending keys
    std::vector<std::uint64_t> dual;     // ~keys ascending
    std::vector<key_t> top;              // top-cell keys, infinity last
    typename Exec::template Array<std::uint32_t> cleared;  // (d-1)-cell in the dual forest
    std::vector<CellPair> pairs0, top_pairs, pairs1;
    std::vector<std::int32_t> match_top;  // (a, b) comparison-younger top cell -> top pair
    std::vector<std::int32_t> pair1_of_birth;
    std::vector<std::uint32_t> pair1_column;
    typename Exec::template Array<std::uint64_t> cols_dev;  // 3D: columns, ascending
    std::vector<key_t> cols;
    std::vector<key_t> rows;        // 3D: edge keys in order (host)
    std::vector<std::uint32_t> pos;  // 3D: edge -> position in rows (host)

    MatchComplex(const Exec& ex, Values x, int ndim, const std::int64_t shape[3], bool superlevel, bool T)
        : pb(ex, x, ndim, shape, superlevel, T) {
        v = pb.vertex_ranks();
        forest0 = pb.forest0();
        dual = pb.forest_top(&cleared);
        top = pb.top_keys();
    }

    void columns() {
        const Exec& ex = pb.ex;
        const std::size_t S = 3 * static_cast<std::size_t>(pb.X.L.points);
        auto key = ex.template array<std::uint64_t>(S);
        auto flag = ex.template array<std::uint32_t>(S);
        ex.for_each(S, ColumnKeys{pb.X.f, cleared.data(), key.data(), flag.data()});
        cols_dev = ex.select_flagged(key.data(), flag.data(), S);
        ex.sort_keys(cols_dev.data(), cols_dev.size(), 0, pb.key_bits());
        cols = ex.to_host(cols_dev.data(), cols_dev.size());
        ex.for_each(S, EdgeKeys{pb.X.e, key.data(), flag.data()});
        auto r = ex.select_flagged(key.data(), flag.data(), S);
        ex.sort_keys(r.data(), r.size(), 0, pb.key_bits());
        ex.for_each(S, Fill<std::uint32_t>{flag.data(), kNone});
        ex.for_each(r.size(), RowPositions{r.data(), flag.data()});
        rows = ex.to_host(r.data(), r.size());
        pos = ex.to_host(flag.data(), S);
    }

    // Own pairs from the pivots of its own reduction (engine.cpp's own_dim1).
    void own_pairs(const std::vector<std::uint32_t>& pivot) {
        pair1_of_birth.assign(3 * static_cast<std::size_t>(pb.X.L.points), -1);
        for (std::size_t i = 0; i < cols.size(); ++i) {
            const std::uint32_t p = pivot[i];
            if (p == kNone || key_rank(rows[pos[p]]) == key_rank(cols[i])) continue;
            pair1_of_birth[p] = static_cast<std::int32_t>(pairs1.size());
            pairs1.push_back({p, key_cell(cols[i])});
            pair1_column.push_back(static_cast<std::uint32_t>(i));
        }
    }
};

// The apparent pivots of X's columns against Y's rows (kNone: reduce on the host).
template <class Exec>
std::vector<std::uint32_t> screen_apparent(const Exec& ex, const MatchComplex<Exec>& X, const MatchComplex<Exec>& Y,
                                           std::size_t* apparent_count = nullptr) {
    const Lattice& L = X.pb.X.L;
    const std::size_t S = 3 * static_cast<std::size_t>(L.points);
    auto raw = ex.template array<std::uint32_t>(S);
    auto first = ex.template array<std::uint64_t>(S);
    auto out = ex.template array<std::uint32_t>(X.cols.size());
    ex.for_each(S, Fill<std::uint64_t>{first.data(), kNoKey});
    ex.for_each(S, OfferColumns{L, X.pb.X.f, X.cleared.data(), Y.pb.X.e, raw.data(), first.data()});
    ex.for_each(X.cols.size(), ApparentPivots{X.cols_dev.data(), raw.data(), first.data(), out.data()});
    std::vector<std::uint32_t> h = ex.to_host(out.data(), X.cols.size());
    if (apparent_count)
        *apparent_count = static_cast<std::size_t>(
            std::count_if(h.begin(), h.end(), [](std::uint32_t e) { return e != kNone; }));
    return h;
}

// Dimension-0 image persistence: c's union-find over c's forest edges carrying the
// elders of a and b (engine.cpp's dimension0_image). For every non-trivial pair of c,
// the a- and b-younger vertices.
inline std::vector<std::pair<std::uint32_t, std::uint32_t>> image_births0(const Lattice& L,
                                                                          const std::vector<std::uint64_t>& forest,
                                                                          const std::vector<rank_t>& vc,
                                                                          const std::vector<rank_t>& v0,
                                                                          const std::vector<rank_t>& v1) {
    const std::size_t N = static_cast<std::size_t>(L.points);
    HostUnionFind uf(N);
    std::vector<std::uint32_t> lab0(N), lab1(N);
    for (std::size_t i = 0; i < N; ++i) lab0[i] = lab1[i] = static_cast<std::uint32_t>(i);
    std::vector<std::pair<std::uint32_t, std::uint32_t>> out;
    for (std::uint64_t key : forest) {
        const std::uint32_t cell = key_cell(key);
        const std::uint32_t a = cell / 3, b = static_cast<std::uint32_t>(a + L.stride[cell % 3]);
        const std::uint32_t ra = uf.find(a), rb = uf.find(b);
        const bool a_younger = make_key(vc[ra], ra) > make_key(vc[rb], rb);
        const std::uint32_t younger = a_younger ? ra : rb, elder = a_younger ? rb : ra;
        uf.parent[younger] = elder;
        const std::uint32_t x0a = lab0[ra], x0b = lab0[rb];
        const bool x0a_younger = make_key(v0[x0a], x0a) > make_key(v0[x0b], x0b);
        lab0[elder] = x0a_younger ? x0b : x0a;
        const std::uint32_t x1a = lab1[ra], x1b = lab1[rb];
        const bool x1a_younger = make_key(v1[x1a], x1a) > make_key(v1[x1b], x1b);
        lab1[elder] = x1a_younger ? x1b : x1a;
        if (vc[younger] != key_rank(key)) out.emplace_back(x0a_younger ? x0a : x0b, x1a_younger ? x1a : x1b);
    }
    return out;
}

// Phase timings on stderr when MEDSEG_TOPOLOGY_PROFILE is set (as engine.cpp's).
struct PhaseClock {
    bool on = std::getenv("MEDSEG_TOPOLOGY_PROFILE") != nullptr;
    std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
    void mark(const char* what) {
        if (!on) return;
        const auto now = std::chrono::steady_clock::now();
        std::fprintf(stderr, "[medseg.topology] parallel %-26s %8.1f ms\n", what,
                     std::chrono::duration<double, std::milli>(now - t).count());
        t = now;
    }
};

struct MatchingStats {  // dimension-1 work (for the benchmark)
    std::size_t columns = 0, apparent = 0, reduced = 0;
};

// Intersection comparison, dimension 0: X's union-find over X's forest edges carrying
// the elders of H (contained in X; engine.cpp's dimension0_into). For every non-trivial
// pair of X, in order, the index of H's pair born at the H-younger vertex (or -1).
inline std::vector<std::int32_t> dim0_into(const Lattice& L, const std::vector<std::uint64_t>& forest,
                                           const std::vector<rank_t>& vx, const std::vector<rank_t>& vh,
                                           const std::vector<CellPair>& h_pairs) {
    const std::size_t N = static_cast<std::size_t>(L.points);
    std::vector<std::int32_t> h_pob(N, -1);
    for (std::size_t i = 0; i < h_pairs.size(); ++i) h_pob[h_pairs[i].birth_cell] = static_cast<std::int32_t>(i);
    HostUnionFind uf(N);
    std::vector<std::uint32_t> lab(N);
    for (std::size_t i = 0; i < N; ++i) lab[i] = static_cast<std::uint32_t>(i);
    std::vector<std::int32_t> out;
    for (std::uint64_t key : forest) {
        const std::uint32_t cell = key_cell(key);
        const std::uint32_t a = cell / 3, b = static_cast<std::uint32_t>(a + L.stride[cell % 3]);
        const std::uint32_t ra = uf.find(a), rb = uf.find(b);
        const bool a_younger = make_key(vx[ra], ra) > make_key(vx[rb], rb);
        const std::uint32_t younger = a_younger ? ra : rb, elder = a_younger ? rb : ra;
        uf.parent[younger] = elder;
        const std::uint32_t ha = lab[ra], hb = lab[rb];
        const bool ha_younger = make_key(vh[ha], ha) > make_key(vh[hb], hb);
        lab[elder] = ha_younger ? hb : ha;
        if (vx[younger] != key_rank(key)) out.push_back(h_pob[ha_younger ? ha : hb]);
    }
    return out;
}

// The Betti matching of a and b, as compute_matching gives it (opt: superlevel,
// construction, comparison, include_unmatched_*, threads for the host passes).
// Union: c = the union, image persistence of a -> c and b -> c; intersection: c = the
// intersection, c -> a and c -> b, a and b matched through the same pair of c.
template <class Exec>
MatchingResult matching_result(const Exec& ex, Values a, Values b, int ndim, const std::int64_t shape[3],
                               const Options& opt, MatchingStats* stats = nullptr) {
    PhaseClock clock;
    const bool superlevel = opt.superlevel, T = opt.construction == Construction::T, inter = opt.intersection;
    const bool take_max = superlevel != inter;  // engine.cpp's rank_comparison
    std::size_t n = 1;
    for (int q = 0; q < ndim; ++q) n *= static_cast<std::size_t>(shape[q]);
    auto cf = ex.template array<float>(a.f32 ? n : 0);
    auto cd = ex.template array<double>(a.f32 ? 0 : n);
    Values c;
    if (a.f32) {
        ex.for_each(n, Combine<float>{a.f32, b.f32, cf.data(), take_max});
        c.f32 = cf.data();
    } else {
        ex.for_each(n, Combine<double>{a.f64, b.f64, cd.data(), take_max});
        c.f64 = cd.data();
    }
    MatchComplex<Exec> A(ex, a, ndim, shape, superlevel, T), B(ex, b, ndim, shape, superlevel, T),
        C(ex, c, ndim, shape, superlevel, T);
    const Lattice& L = A.pb.X.L;
    const int d = L.ndim;
    const int threads = std::max(1, opt.threads);
    clock.mark("ranks, cells, forests");

    // 3D dimension 1: columns and apparent pivots where Exec computes, then the host.
    // Reductions 3 and 4 are the image reductions: (c columns, a/b rows) for the union,
    // (a/b columns, c rows) for the intersection.
    std::vector<std::uint32_t> ap[5], piv[5];
    if (d == 3) {
        A.columns();
        B.columns();
        C.columns();
        const MatchComplex<Exec>* cr[5][2] = {{&A, &A}, {&B, &B}, {&C, &C}, {&C, &A}, {&C, &B}};
        if (inter) {
            cr[3][0] = &A, cr[3][1] = &C;
            cr[4][0] = &B, cr[4][1] = &C;
        }
        std::size_t app[5] = {0, 0, 0, 0, 0};
        for (int r = 0; r < 5; ++r) ap[r] = screen_apparent(ex, *cr[r][0], *cr[r][1], &app[r]);
        clock.mark("dim 1: columns, screening");
        std::size_t red[5] = {0, 0, 0, 0, 0};
        std::vector<std::function<void()>> tasks;
        for (int r = 0; r < 5; ++r)
            tasks.push_back([&, r] {
                piv[r] = reduce_remaining(L, cr[r][0]->cols, ap[r], cr[r][1]->pos, cr[r][1]->rows, &red[r]);
            });
        run_host_tasks(tasks, threads);
        clock.mark("dim 1: host reductions");
        MatchingStats st;
        for (int r = 0; r < 5; ++r) {
            st.columns += cr[r][0]->cols.size();
            st.apparent += app[r];
            st.reduced += red[r];
        }
        if (stats) *stats = st;
        if (std::getenv("MEDSEG_TOPOLOGY_PROFILE"))  // development aid, as in engine.cpp
            std::fprintf(stderr, "[medseg.topology] parallel dim 1: %zu columns, %zu apparent, %zu reduced on the host\n",
                         st.columns, st.apparent, st.reduced);
    }
    // Host passes (independent of each other).
    std::vector<std::pair<std::uint32_t, std::uint32_t>> births0;
    std::vector<CellPair> c_top_again[2];  // intersection: c's top pairs with a's / b's labels
    {
        std::vector<std::function<void()>> tasks = {
            [&] { dim0_pass(L, A.forest0, A.v, A.pairs0); },
            [&] { dim0_pass(L, B.forest0, B.v, B.pairs0); },
        };
        if (!inter) {
            tasks.push_back([&] { births0 = image_births0(L, C.forest0, C.v, A.v, B.v); });
            tasks.push_back([&] { top_pass(L, A.dual, A.top, &C.top, &A.match_top, A.top_pairs); });
            tasks.push_back([&] { top_pass(L, B.dual, B.top, &C.top, &B.match_top, B.top_pairs); });
            tasks.push_back([&] { top_pass(L, C.dual, C.top, nullptr, nullptr, C.top_pairs); });
        } else {  // match_top[a/b-younger top cell] = index of c's pair (engine.cpp's into_comparison)
            tasks.push_back([&] { dim0_pass(L, C.forest0, C.v, C.pairs0); });
            tasks.push_back([&] { top_pass(L, A.dual, A.top, nullptr, nullptr, A.top_pairs); });
            tasks.push_back([&] { top_pass(L, B.dual, B.top, nullptr, nullptr, B.top_pairs); });
            tasks.push_back([&] { top_pass(L, C.dual, C.top, &A.top, &A.match_top, c_top_again[0]); });
            tasks.push_back([&] { top_pass(L, C.dual, C.top, &B.top, &B.match_top, c_top_again[1]); });
        }
        if (d == 3) {
            tasks.push_back([&] { A.own_pairs(piv[0]); });
            tasks.push_back([&] { B.own_pairs(piv[1]); });
            tasks.push_back([&] { C.own_pairs(piv[2]); });
        }
        run_host_tasks(tasks, threads);
    }
    std::vector<std::int32_t> into0[2];  // intersection, dimension 0 (needs c's pairs)
    if (inter) {
        std::vector<std::function<void()>> tasks = {
            [&] { into0[0] = dim0_into(L, A.forest0, A.v, C.v, C.pairs0); },
            [&] { into0[1] = dim0_into(L, B.forest0, B.v, C.v, C.pairs0); },
        };
        run_host_tasks(tasks, threads);
    }
    clock.mark("elder-rule passes");

    // Matches per dimension (index in a's pairs, index in b's pairs), in the engine's order.
    std::vector<std::vector<std::pair<std::int32_t, std::int32_t>>> matches(d);
    if (inter) {
        // to_c[side][k][i] = the pair of c matched with pair i of side's dimension k
        std::vector<std::vector<std::int32_t>> to_c[2];
        const MatchComplex<Exec>* X[2] = {&A, &B};
        for (int side = 0; side < 2; ++side) {
            to_c[side].resize(d);
            to_c[side][0] = into0[side];
            if (d == 3)
                for (std::size_t q = 0; q < X[side]->pairs1.size(); ++q) {
                    const std::uint32_t e = piv[3 + side][X[side]->pair1_column[q]];
                    to_c[side][1].push_back(e == kNone ? -1 : C.pair1_of_birth[e]);
                }
            for (const CellPair& p : X[side]->top_pairs) to_c[side][d - 1].push_back(X[side]->match_top[p.death_cell]);
        }
        for (int k = 0; k < d; ++k) {
            const std::size_t nc = k == 0 ? C.pairs0.size() : k == d - 1 ? c_top_again[0].size() : C.pairs1.size();
            std::vector<std::int32_t> b_of_c(nc, -1);
            for (std::size_t j = 0; j < to_c[1][k].size(); ++j)
                if (to_c[1][k][j] >= 0) b_of_c[to_c[1][k][j]] = static_cast<std::int32_t>(j);
            for (std::size_t i = 0; i < to_c[0][k].size(); ++i)
                if (to_c[0][k][i] >= 0 && b_of_c[to_c[0][k][i]] >= 0)
                    matches[k].emplace_back(static_cast<std::int32_t>(i), b_of_c[to_c[0][k][i]]);
        }
    } else {
        const std::size_t N = static_cast<std::size_t>(L.points);
        std::vector<std::int32_t> pob0(N, -1), pob1(N, -1);
        for (std::size_t i = 0; i < A.pairs0.size(); ++i) pob0[A.pairs0[i].birth_cell] = static_cast<std::int32_t>(i);
        for (std::size_t i = 0; i < B.pairs0.size(); ++i) pob1[B.pairs0[i].birth_cell] = static_cast<std::int32_t>(i);
        for (const auto& [y0, y1] : births0)
            if (pob0[y0] >= 0 && pob1[y1] >= 0) matches[0].emplace_back(pob0[y0], pob1[y1]);
        if (d == 3)
            for (std::size_t q = 0; q < C.pairs1.size(); ++q) {
                const std::uint32_t col = C.pair1_column[q];
                const std::uint32_t e0 = piv[3][col], e1 = piv[4][col];
                if (e0 == kNone || e1 == kNone) continue;
                const std::int32_t i0 = A.pair1_of_birth[e0], i1 = B.pair1_of_birth[e1];
                if (i0 >= 0 && i1 >= 0) matches[1].emplace_back(i0, i1);
            }
        for (const CellPair& p : C.top_pairs) {
            const std::int32_t i0 = A.match_top[p.death_cell], i1 = B.match_top[p.death_cell];
            if (i0 >= 0 && i1 >= 0) matches[d - 1].emplace_back(i0, i1);
        }
    }

    // Coordinates (engine.cpp's assemble).
    MatchingResult res;
    res.ndim = d;
    res.matched_a.resize(d);
    res.matched_b.resize(d);
    res.unmatched_a.resize(d);
    res.unmatched_b.resize(d);
    res.num_unmatched_a.assign(d, 0);
    res.num_unmatched_b.assign(d, 0);
    auto death = [d](int k, const CellPair& p) -> std::uint64_t {
        return k == d - 1 && d == 2 ? 3ull * p.death_cell + 2 : p.death_cell;
    };
    for (int k = 0; k < d; ++k) {
        const std::vector<CellPair>& p0 = k == 0 ? A.pairs0 : k == d - 1 ? A.top_pairs : A.pairs1;
        const std::vector<CellPair>& p1 = k == 0 ? B.pairs0 : k == d - 1 ? B.top_pairs : B.pairs1;
        std::vector<char> used0(p0.size(), 0), used1(p1.size(), 0);
        std::vector<std::uint64_t> ma, mb, ua, ub;
        for (const auto& [i0, i1] : matches[k]) {
            used0[i0] = used1[i1] = 1;
            ma.insert(ma.end(), {p0[i0].birth_cell, death(k, p0[i0])});
            mb.insert(mb.end(), {p1[i1].birth_cell, death(k, p1[i1])});
        }
        res.num_unmatched_a[k] = static_cast<std::int64_t>(p0.size() - matches[k].size());
        res.num_unmatched_b[k] = static_cast<std::int64_t>(p1.size() - matches[k].size());
        if (opt.include_unmatched_a)
            for (std::size_t i = 0; i < p0.size(); ++i)
                if (!used0[i]) ua.insert(ua.end(), {p0[i].birth_cell, death(k, p0[i])});
        if (opt.include_unmatched_b)
            for (std::size_t i = 0; i < p1.size(); ++i)
                if (!used1[i]) ub.insert(ub.end(), {p1[i].birth_cell, death(k, p1[i])});
        A.pb.report(ma, k, k + 1, res.matched_a[k]);
        B.pb.report(mb, k, k + 1, res.matched_b[k]);
        A.pb.report(ua, k, k + 1, res.unmatched_a[k]);
        B.pb.report(ub, k, k + 1, res.unmatched_b[k]);
    }
    clock.mark("matches, coordinates");
    return res;
}

// The barcode of one image with dimension 1 of 3D images screened and reduced as in
// the matching (own columns against own rows): every dimension without the sequential
// engine. Same pairs, same order as compute_barcode.
template <class Exec>
BarcodeResult barcode_result(const Exec& ex, Values x, int ndim, const std::int64_t shape[3], bool superlevel, bool T,
                             MatchingStats* stats = nullptr) {
    MatchComplex<Exec> X(ex, x, ndim, shape, superlevel, T);
    const Lattice& L = X.pb.X.L;
    const int d = L.ndim;
    dim0_pass(L, X.forest0, X.v, X.pairs0);
    top_pass(L, X.dual, X.top, nullptr, nullptr, X.top_pairs);
    if (d == 3) {
        X.columns();
        std::size_t app = 0, red = 0;
        const std::vector<std::uint32_t> ap = screen_apparent(ex, X, X, &app);
        X.own_pairs(reduce_remaining(L, X.cols, ap, X.pos, X.rows, &red));
        if (stats) {
            stats->columns += X.cols.size();
            stats->apparent += app;
            stats->reduced += red;
        }
    }
    BarcodeResult res;
    res.ndim = d;
    res.pairs.resize(d);
    auto cells = [](const std::vector<CellPair>& ps, bool top2d) {
        std::vector<std::uint64_t> c;
        for (const CellPair& p : ps) c.insert(c.end(), {p.birth_cell, top2d ? 3ull * p.death_cell + 2 : p.death_cell});
        return c;
    };
    X.pb.report(cells(X.pairs0, false), 0, 1, res.pairs[0]);
    if (d == 3) X.pb.report(cells(X.pairs1, false), 1, 2, res.pairs[1]);
    X.pb.report(cells(X.top_pairs, d == 2), d - 1, d, res.pairs[d - 1]);
    const std::uint32_t e = X.pb.essential(X.v);
    VoxelPairs ess;
    X.pb.report({e, e}, 0, 0, ess);
    res.essential_birth = ess.birth;
    return res;
}

}  // namespace par
}  // namespace medseg
