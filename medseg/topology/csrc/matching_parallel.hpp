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
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "host_passes.hpp"
#include "spanning.hpp"

namespace medseg {
namespace par {

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

// Host: the left-to-right reduction of the columns that are not apparent, with the
// owner of every apparent pivot filled in first (host::ColumnReduction, the sequential
// engine's reduction; pos: edge -> position in row order, rows: the row keys in order).
// pivot[i] = the pivot edge of column i, or kNone for a zero column.
inline std::vector<std::uint32_t> reduce_remaining(const Lattice& L, const std::vector<key_t>& cols,
                                                   const std::vector<std::uint32_t>& apparent,
                                                   const std::vector<std::uint32_t>& pos,
                                                   const std::vector<key_t>& rows, std::size_t* reduced = nullptr) {
    const std::size_t n = cols.size();
    std::vector<std::uint32_t> pivot(n, kNone);
    host::ColumnReduction<std::uint64_t> red(L, pos.data(), rows.size());
    for (std::size_t i = 0; i < n; ++i)
        if (apparent[i] != kNone) {
            red.own_raw(pos[apparent[i]], key_cell(cols[i]));
            pivot[i] = apparent[i];
        }
    std::size_t count = 0;
    for (std::size_t i = 0; i < n; ++i) {
        if (apparent[i] != kNone) continue;
        ++count;
        const std::uint32_t cell = key_cell(cols[i]);
        std::uint32_t b[4];
        red.boundary(cell, b);
        std::uint32_t p = b[0];
        if (red.is_free(p)) red.own_raw(p, cell);  // pivot free when reached: taken as it stands
        else p = red.reduce(cell, p);
        if (p != kNone) pivot[i] = key_cell(rows[p]);
    }
    if (reduced) *reduced = count;
    return pivot;
}

// One complex of the matching: its filtration (where Exec computes) and its host-side
// pieces.
template <class Exec>
struct MatchComplex {
    ParallelBarcode<Exec> pb;
    std::vector<rank_t> v;               // vertex ranks
    std::vector<std::uint64_t> forest0;  // ascending keys
    std::vector<std::uint64_t> dual;     // ~keys ascending
    std::vector<rank_t> top;             // top-cell ranks, infinity last
    typename Exec::template Array<std::uint32_t> cleared;  // (d-1)-cell in the dual forest
    std::vector<CellPair> pairs0, top_pairs, pairs1;
    big_vector<std::int32_t> match_top;  // (a, b) comparison-younger top cell -> top pair
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
        top = pb.top_ranks();
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

struct MatchingStats {  // dimension-1 work (for the benchmark)
    std::size_t columns = 0, apparent = 0, reduced = 0;
};

// The host passes over spanning-forest edges (host_passes.hpp; forests hold keys
// ascending, dual forests complemented keys ascending, i.e. keys descending).
inline auto forest_keys(const std::vector<std::uint64_t>& forest) {
    return [&forest](std::size_t i) { return forest[i]; };
}
inline auto dual_keys(const std::vector<std::uint64_t>& dual) {
    return [&dual](std::size_t i) { return ~dual[i]; };
}
template <class Exec>
void dim0_pass(const MatchComplex<Exec>& X, std::vector<CellPair>& pairs) {
    host::dim0_pass(X.pb.X.L, X.forest0.size(), forest_keys(X.forest0), X.v.data(), pairs);
}
// X's top pairs; with comp_top (another complex's top ranks) its labels are carried
// (image persistence), see host::top_pass.
template <class Exec>
void top_pass(const MatchComplex<Exec>& X, const rank_t* comp_top, big_vector<std::int32_t>* match_top,
              std::vector<CellPair>& pairs) {
    auto no_column = [](std::uint32_t) {};
    if (!comp_top) {
        host::top_pass(X.pb.X.L, X.dual.size(), dual_keys(X.dual), X.top.data(), pairs, [](const host::TopMerge&) {},
                       no_column);
        return;
    }
    host::TopLabels labels(static_cast<std::size_t>(X.pb.X.L.points), comp_top, *match_top);
    host::top_pass(X.pb.X.L, X.dual.size(), dual_keys(X.dual), X.top.data(), pairs,
                   [&](const host::TopMerge& m) { labels(m); }, no_column,
                   [&](std::uint32_t x) { labels.prefetch(x); });
}

// The Betti matching of a and b, as compute_matching gives it (opt: superlevel,
// construction, comparison, include_unmatched_*, threads for the host passes).
// Union: c = the union, image persistence of a -> c and b -> c; intersection: c = the
// intersection, c -> a and c -> b, a and b matched through the same pair of c.
template <class Exec>
MatchingResult matching_result(const Exec& ex, Values a, Values b, int ndim, const std::int64_t shape[3],
                               const Options& opt, MatchingStats* stats = nullptr) {
    host::PhaseTimer clock{"parallel "};
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
        host::run_tasks(tasks, threads);
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
            [&] { dim0_pass(A, A.pairs0); },
            [&] { dim0_pass(B, B.pairs0); },
        };
        if (!inter) {
            tasks.push_back([&] {
                births0 = host::image_births0(L, C.forest0.size(), forest_keys(C.forest0), C.v.data(), A.v.data(),
                                              B.v.data());
            });
            tasks.push_back([&] { top_pass(A, C.top.data(), &A.match_top, A.top_pairs); });
            tasks.push_back([&] { top_pass(B, C.top.data(), &B.match_top, B.top_pairs); });
            tasks.push_back([&] { top_pass(C, nullptr, nullptr, C.top_pairs); });
        } else {  // match_top[a/b-younger top cell] = index of c's pair (engine.cpp's into_comparison)
            tasks.push_back([&] { dim0_pass(C, C.pairs0); });
            tasks.push_back([&] { top_pass(A, nullptr, nullptr, A.top_pairs); });
            tasks.push_back([&] { top_pass(B, nullptr, nullptr, B.top_pairs); });
            tasks.push_back([&] { top_pass(C, A.top.data(), &A.match_top, c_top_again[0]); });
            tasks.push_back([&] { top_pass(C, B.top.data(), &B.match_top, c_top_again[1]); });
        }
        if (d == 3) {
            tasks.push_back([&] { A.own_pairs(piv[0]); });
            tasks.push_back([&] { B.own_pairs(piv[1]); });
            tasks.push_back([&] { C.own_pairs(piv[2]); });
        }
        host::run_tasks(tasks, threads);
    }
    std::vector<std::int32_t> into0[2];  // intersection, dimension 0 (needs c's pairs)
    if (inter) {
        const big_vector<std::int32_t> c_pob = host::pairs_by_birth(C.pairs0, static_cast<std::size_t>(L.points));
        auto into = [&](const MatchComplex<Exec>& X) {
            return host::dim0_into(L, X.forest0.size(), forest_keys(X.forest0), X.v.data(), C.v.data(), c_pob.data());
        };
        std::vector<std::function<void()>> tasks = {
            [&] { into0[0] = into(A); },
            [&] { into0[1] = into(B); },
        };
        host::run_tasks(tasks, threads);
    }
    clock.mark("elder-rule passes");

    // Matches per dimension (index in a's pairs, index in b's pairs), in the engine's order.
    host::Matches matches(d);
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
            matches[k] = host::matched_through(to_c[0][k], to_c[1][k], nc);
        }
    } else {
        const std::size_t N = static_cast<std::size_t>(L.points);
        const big_vector<std::int32_t> pob0 = host::pairs_by_birth(A.pairs0, N), pob1 = host::pairs_by_birth(B.pairs0, N);
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

    // Coordinates, reported where the filtration lives.
    auto pairs_of = [d](const MatchComplex<Exec>& X) {
        return [&X, d](int k) -> const std::vector<CellPair>& {
            return k == 0 ? X.pairs0 : k == d - 1 ? X.top_pairs : X.pairs1;
        };
    };
    auto report_with = [](const MatchComplex<Exec>& X) {
        return [&X](const std::vector<std::uint64_t>& cells, int k, VoxelPairs& out) { X.pb.report(cells, k, k + 1, out); };
    };
    MatchingResult res = host::assemble_matching(d, pairs_of(A), pairs_of(B), matches, opt, report_with(A), report_with(B));
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
    dim0_pass(X, X.pairs0);
    top_pass(X, nullptr, nullptr, X.top_pairs);
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
    res.essential_birth.assign(ess.birth.begin(), ess.birth.end());
    return res;
}

}  // namespace par
}  // namespace medseg
