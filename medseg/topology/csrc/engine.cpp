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
#include "big_vector.hpp"
#include "host_passes.hpp"
#include "spanning.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

namespace medseg {
namespace {

using host::PhaseTimer;
using host::run_tasks;

// ---------------------------------------------------------------------------------
// Parallel tasks

// A small task graph: a task starts once the tasks it depends on have finished, and
// of the ready tasks the one added first starts first (add long ones early). With the
// phase timer on, the tasks run one by one in the order they were added (dependencies
// always point to earlier tasks) and are timed one by one.
class TaskGraph {
  public:
    int add(const char* name, std::function<void()> fn, std::initializer_list<int> deps = {}) {
        const int id = static_cast<int>(tasks_.size());
        tasks_.push_back({name, std::move(fn), 0, {}});
        for (int dep : deps) {
            if (dep < 0) continue;  // an optional task that was not added
            if (dep >= id) throw std::logic_error("task graph: a dependency must be added first");
            ++tasks_[id].waiting;
            tasks_[dep].dependents.push_back(id);
        }
        return id;
    }

    void run(int threads, PhaseTimer& timer) {
        if (timer.on || threads <= 1) {
            for (Task& t : tasks_) {
                t.fn();
                timer.mark(t.name);
            }
            return;
        }
        std::mutex mutex;
        std::condition_variable wake;
        std::vector<int> ready;  // kept sorted, descending: the smallest id at the back
        for (int i = static_cast<int>(tasks_.size()) - 1; i >= 0; --i)
            if (tasks_[i].waiting == 0) ready.push_back(i);
        std::size_t finished = 0;
        std::exception_ptr error;
        auto worker = [&]() {
            std::unique_lock<std::mutex> lock(mutex);
            for (;;) {
                wake.wait(lock, [&] { return !ready.empty() || finished == tasks_.size() || error; });
                if (ready.empty() || error) return;
                const int id = ready.back();
                ready.pop_back();
                lock.unlock();
                std::exception_ptr failed;
                try {
                    tasks_[id].fn();
                } catch (...) {
                    failed = std::current_exception();
                }
                lock.lock();
                ++finished;
                if (failed && !error) error = failed;
                for (int next : tasks_[id].dependents)
                    if (--tasks_[next].waiting == 0)
                        ready.insert(std::upper_bound(ready.begin(), ready.end(), next, std::greater<int>()), next);
                wake.notify_all();
            }
        };
        const int n = std::min<int>(threads, static_cast<int>(tasks_.size()));
        std::vector<std::thread> pool;
        for (int i = 1; i < n; ++i) pool.emplace_back(worker);
        worker();
        for (auto& th : pool) th.join();
        if (error) std::rethrow_exception(error);
    }

  private:
    struct Task {
        const char* name;
        std::function<void()> fn;
        int waiting;
        std::vector<int> dependents;
    };
    std::vector<Task> tasks_;
};

// ---------------------------------------------------------------------------------
// Radix sorts

constexpr int kDigitBits = 11;
constexpr std::uint64_t kDigitMask = (1u << kDigitBits) - 1;

// Stable LSD radix sort of 64-bit words by bits [lo, hi).
void radix_sort_u64(big_vector<std::uint64_t>& a, int lo, int hi) {
    if (a.size() < 2 || hi <= lo) return;
    big_vector<std::uint64_t> tmp(a.size());
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

// Dense ranks when the image holds at most kFewValues distinct values (masks, label
// maps, quantised images): two streaming passes instead of a radix sort of 64-bit
// (value, index) keys. Returns false, with `out` untouched, for more values.
constexpr std::size_t kFewValues = 64;

template <class T>
bool few_value_ranks(const T* x, std::int64_t n, big_vector<rank_t>& out, rank_t& num) {
    std::uint64_t values[kFewValues];
    std::size_t count = 0;
    std::uint64_t last = 0;
    bool have_last = false;
    for (std::int64_t i = 0; i < n; ++i) {
        const std::uint64_t v = order_bits(x[i]);
        if (have_last && v == last) continue;
        last = v;
        have_last = true;
        if (std::find(values, values + count, v) != values + count) continue;
        if (count == kFewValues) return false;
        values[count++] = v;
    }
    std::sort(values, values + count);
    out.resize(n);
    rank_t last_rank = 0;
    have_last = false;
    for (std::int64_t i = 0; i < n; ++i) {
        const std::uint64_t v = order_bits(x[i]);
        if (!have_last || v != last) {
            last = v;
            have_last = true;
            last_rank = static_cast<rank_t>(std::lower_bound(values, values + count, v) - values);
        }
        out[i] = last_rank;
    }
    num = static_cast<rank_t>(count);
    return true;
}

// Dense ranks of one image (equal values, equal ranks), sublevel order. Returns the
// number of distinct values.
template <class T>
rank_t dense_ranks(const T* x, std::int64_t n, big_vector<rank_t>& out) {
    if (n == 0) {
        out.clear();
        return 0;
    }
    rank_t num = 0;
    if (few_value_ranks(x, n, out, num)) return num;
    out.resize(n);
    std::uint64_t count = 0;
    if (sizeof(T) == 4) {
        big_vector<std::uint64_t> keys(n);
        for (std::int64_t i = 0; i < n; ++i) keys[i] = (order_bits(x[i]) << 32) | static_cast<std::uint64_t>(i);
        radix_sort_u64(keys, 32, 64);
        std::uint64_t prev = ~0ull;
        for (std::uint64_t k : keys) {
            count += (k >> 32) != prev;
            prev = k >> 32;
            out[k & 0xffffffffull] = static_cast<rank_t>(count - 1);
        }
        return static_cast<rank_t>(count);
    }
    // Sort by the upper 32 bits of the 64-bit order key with the index packed in the
    // lower half (3 radix passes over 8-byte words instead of 6 over 16-byte records),
    // then order the rare runs that tie on the upper half by the full key.
    big_vector<std::uint64_t> keys(n), full(n);
    for (std::int64_t i = 0; i < n; ++i) {
        full[i] = order_bits(x[i]);
        keys[i] = (full[i] & 0xffffffff00000000ull) | static_cast<std::uint64_t>(i);
    }
    radix_sort_u64(keys, 32, 64);
    const std::size_t total = static_cast<std::size_t>(n);
    for (std::size_t s = 0; s < total;) {
        std::size_t e = s + 1;
        while (e < total && (keys[e] >> 32) == (keys[s] >> 32)) ++e;
        if (e - s > 1) {
            const std::uint64_t f0 = full[keys[s] & 0xffffffffull];
            bool same = true;
            for (std::size_t q = s + 1; q < e && same; ++q) same = full[keys[q] & 0xffffffffull] == f0;
            if (!same)
                std::sort(keys.begin() + s, keys.begin() + e, [&](std::uint64_t a, std::uint64_t b) {
                    return full[a & 0xffffffffull] < full[b & 0xffffffffull];
                });
        }
        s = e;
    }
    bool first = true;
    std::uint64_t prev = 0;
    for (std::uint64_t k : keys) {
        const std::uint64_t f = full[k & 0xffffffffull];
        count += first || f != prev;
        prev = f;
        first = false;
        out[k & 0xffffffffull] = static_cast<rank_t>(count - 1);
    }
    return static_cast<rank_t>(count);
}

// ---------------------------------------------------------------------------------
// Filtration: ranks of all cells of one complex

struct Filtration {
    Lattice L;                 // lattice of points of the complex
    Construction construction = Construction::V;
    Lattice pixels;            // T only: lattice of voxels (top cells)
    big_vector<rank_t> pix;   // T only: voxel ranks
    big_vector<rank_t> v, e, f, c;
    rank_t num_ranks = 0;

    int dim() const { return L.ndim; }
    rank_t top(std::int64_t l) const { return L.ndim == 3 ? c[l] : f[3 * l + 2]; }
    // rank of a (d-1)-cell
    const big_vector<rank_t>& sub() const { return L.ndim == 3 ? f : e; }
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

// Sorted keys of all cells of one dimension that exist. Few ranks (masks): a counting
// sort straight into place (cells are visited in index order, so each rank's run is
// ordered by index, as the key order wants); otherwise an LSD radix sort on the rank
// bits of the keys.
constexpr rank_t kCountingSortRanks = 1u << 12;

big_vector<key_t> sorted_keys(const big_vector<rank_t>& ranks, rank_t num_ranks) {
    if (num_ranks <= kCountingSortRanks) {
        std::vector<std::size_t> start(num_ranks + 1, 0);
        for (rank_t r : ranks)
            if (r != kInfRank) ++start[r + 1];
        for (rank_t r = 0; r < num_ranks; ++r) start[r + 1] += start[r];
        big_vector<key_t> keys(start[num_ranks]);
        for (std::size_t i = 0; i < ranks.size(); ++i)
            if (ranks[i] != kInfRank) keys[start[ranks[i]]++] = make_key(ranks[i], i);
        return keys;
    }
    std::size_t count = 0;
    for (rank_t r : ranks) count += (r != kInfRank);
    big_vector<key_t> keys;
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
        auto ptr = [](const big_vector<rank_t>& a) { return a.empty() ? nullptr : const_cast<rank_t*>(a.data()); };
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
// Top dimension: union-find on the dual graph.

struct TopDim {
    std::vector<CellPair> pairs;   // (d-1)-cell, top cell
    big_vector<std::uint32_t> columns;  // (d-1)-cells that did not merge, in ascending key order
};

// Top-cell keys by base point (in 2D the squares with normal z), with the point at
// infinity last and largest (kNoKey).
big_vector<key_t> top_keys(const Filtration& F) {
    const std::int64_t N = F.L.points;
    big_vector<key_t> k(N + 1);
    for (std::int64_t p = 0; p < N; ++p)
        k[p] = F.top(p) == kInfRank ? kNoKey : make_key(F.top(p), static_cast<std::uint64_t>(p));
    k[N] = kNoKey;
    return k;
}

// X: the complex; sub_sorted: its (d-1)-cells ascending. If comp is given, the comp
// elder of every component is carried along (image persistence into comp) and
// match_top[comp-younger top cell] receives the index of X's pair.
void top_dimension(const Filtration& X, const big_vector<key_t>& sub_sorted, const Filtration* comp,
                   big_vector<std::int32_t>* match_top, TopDim& out, bool keep_columns) {
    const big_vector<key_t> xtop = top_keys(X);
    const big_vector<key_t> ctop = comp ? top_keys(*comp) : big_vector<key_t>();
    const std::size_t n = sub_sorted.size();
    if (keep_columns) out.columns.reserve(n);
    host::top_pass(
        X.L, n, [&](std::size_t i) { return sub_sorted[n - 1 - i]; }, xtop.data(), comp ? ctop.data() : nullptr,
        match_top, out.pairs, [&](std::uint32_t cell) {
            if (keep_columns) out.columns.push_back(cell);
        });
    std::reverse(out.columns.begin(), out.columns.end());
}

// ---------------------------------------------------------------------------------
// Dimension 1 in 3D: boundary-matrix reduction of the squares.

// The row side of a dimension-1 reduction: the edges in the order of one filtration.
// It depends on the row filtration only (square boundaries are geometric), so one
// instance serves every reduction with the same rows (a's own and the image a -> C).
struct RowOrder {
    const big_vector<key_t>* rows = nullptr;  // the edges, ascending keys
    big_vector<std::uint32_t> pos;            // edge -> its position in *rows
    big_vector<std::uint32_t> raw_pivot;      // square -> largest position in its boundary
};

// Largest boundary position of every square, in one streaming pass in index order
// (the column loop visits squares in filtration order, i.e. at random; this turns its
// four scattered lookups per column into one, which is prefetched).
RowOrder row_order(const Lattice& L, const big_vector<rank_t>& squares, const big_vector<key_t>& rows_sorted) {
    RowOrder R;
    R.rows = &rows_sorted;
    R.pos.assign(3 * L.points, kNone);
    for (std::size_t r = 0; r < rows_sorted.size(); ++r) R.pos[key_cell(rows_sorted[r])] = static_cast<std::uint32_t>(r);
    R.raw_pivot.assign(3 * L.points, 0);
    for (std::size_t c = 0; c < R.raw_pivot.size(); ++c) {
        if (squares[c] == kInfRank) continue;  // no such square
        std::uint32_t e[4];
        square_edges(L, static_cast<std::uint32_t>(c), e);
        R.raw_pivot[c] = std::max(std::max(R.pos[e[0]], R.pos[e[1]]), std::max(R.pos[e[2]], R.pos[e[3]]));
    }
    return R;
}

// Reduces the columns (squares, in the given order) against the rows, the edges in the
// order R.rows (ascending keys of the row filtration); clearing has already removed
// every positive square, so all columns are expected to be non-zero.
// pivot[i] = the pivot edge (packed cell) of column i, or kNone for a zero column.
// Rows are handled by their position in rows_sorted, so a column is a set of 32-bit
// positions and its pivot is the largest position.
template <class Owner>
void reduce_dim1_impl(const Lattice& L, const RowOrder& R, const big_vector<std::uint32_t>& columns,
                      big_vector<std::uint32_t>& pivot) {
    const big_vector<std::uint32_t>& raw_pivot = R.raw_pivot;
    const std::size_t ncols = columns.size();
    pivot.assign(ncols, kNone);
    host::ColumnReduction<Owner> red(L, R.pos.data(), R.rows->size());
    constexpr std::size_t kAhead = 16;
    for (std::size_t i = 0; i < ncols; ++i) {
        if (i + 2 * kAhead < ncols) __builtin_prefetch(&raw_pivot[columns[i + 2 * kAhead]]);
        if (i + kAhead < ncols) red.prefetch_owner(raw_pivot[columns[i + kAhead]]);
        const std::uint32_t cell = columns[i];
        const std::uint32_t p = raw_pivot[cell];
        if (red.is_free(p)) {  // the pivot is free when reached: the column stays as it is
            red.own_raw(p, cell);
            pivot[i] = p;
        } else {
            pivot[i] = red.reduce(cell, p);
        }
    }
    for (auto& p : pivot)
        if (p != kNone) p = key_cell((*R.rows)[p]);
    if (std::getenv("MEDSEG_TOPOLOGY_PROFILE"))
        std::fprintf(stderr, "  reduce: %zu columns, %zu reduced, %zu additions, stored entries %zu\n", ncols,
                     red.reduced, red.additions, red.stored());
}

// 32-bit owner words (half the cache footprint) whenever the cells fit in 31 bits.
void reduce_dim1(const Lattice& L, const RowOrder& R, const big_vector<std::uint32_t>& columns,
                 big_vector<std::uint32_t>& pivot) {
    if (3 * L.points < (std::int64_t(1) << 31)) {
        try {
            return reduce_dim1_impl<std::uint32_t>(L, R, columns, pivot);
        } catch (const std::length_error&) {  // more than 2^31 stored entries: retry wide
        }
    }
    reduce_dim1_impl<std::uint64_t>(L, R, columns, pivot);
}

// ---------------------------------------------------------------------------------
// Dimension 0: union-find with the elder rule.

struct Dim0 {
    std::vector<CellPair> pairs;               // birth vertex, death edge
    big_vector<std::int32_t> pair_of_birth;   // vertex -> index in pairs, or -1
};

// Reads the keys of a sorted cell array (the passes' key_at).
inline auto keys_of(const big_vector<key_t>& keys) {
    return [&keys](std::size_t i) { return keys[i]; };
}

void dimension0(const Filtration& X, const big_vector<key_t>& edges, Dim0& out) {
    host::dim0_pass(X.L, edges.size(), keys_of(edges), X.v.data(), out.pairs);
    out.pair_of_birth = host::pairs_by_birth(out.pairs, static_cast<std::size_t>(X.L.points));
}

// The comparison's union-find carrying the elders of X0 and X1: for every non-trivial
// comparison pair, the X0- and X1-younger vertices.
std::vector<std::pair<std::uint32_t, std::uint32_t>> dimension0_image(const Filtration& C, const Filtration& X0,
                                                                      const Filtration& X1,
                                                                      const big_vector<key_t>& edges) {
    return host::image_births0(C.L, edges.size(), keys_of(edges), C.v.data(), X0.v.data(), X1.v.data());
}

// ---------------------------------------------------------------------------------
// Per-image work shared by barcodes and matchings

struct Complex {
    Filtration F;
    big_vector<key_t> edges;    // sorted
    big_vector<key_t> subs;     // sorted (d-1)-cells (3D only; in 2D these are the edges)
    TopDim top;
    big_vector<std::uint32_t> pivot1;  // 3D: pivot edge of each column of top.columns
    std::vector<CellPair> pairs1;       // 3D: (edge, square)
    std::vector<std::pair<std::uint32_t, std::int32_t>> pair1_by_birth;  // 3D: (edge, index in pairs1), by edge
    big_vector<std::uint32_t> pair1_column;   // 3D: column index of each pair
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

void make_filtration(Filtration& F, const Lattice& pixels, big_vector<rank_t>&& ranks,
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

const big_vector<key_t>& sub_cells(const Complex& X) { return X.F.dim() == 3 ? X.subs : X.edges; }

// X's own dimension-1 pairs; R = row_order of X's edges.
void own_dim1(Complex& X, const RowOrder& R) {
    reduce_dim1(X.F.L, R, X.top.columns, X.pivot1);
    for (std::size_t i = 0; i < X.top.columns.size(); ++i) {
        const std::uint32_t p = X.pivot1[i], square = X.top.columns[i];
        if (p == kNone) continue;
        if (X.F.e[p] != X.F.f[square]) {
            X.pair1_by_birth.emplace_back(p, static_cast<std::int32_t>(X.pairs1.size()));
            X.pairs1.push_back({p, square});
            X.pair1_column.push_back(static_cast<std::uint32_t>(i));
        }
    }
    std::sort(X.pair1_by_birth.begin(), X.pair1_by_birth.end());
    big_vector<std::uint32_t>().swap(X.pivot1);
}

// Index in X.pairs1 of the pair born at `edge`, or -1 (a sorted list rather than a
// per-edge array: dimension-1 pairs are few next to the 3 * points edges).
std::int32_t pair1_of_birth(const Complex& X, std::uint32_t edge) {
    auto it = std::lower_bound(X.pair1_by_birth.begin(), X.pair1_by_birth.end(),
                               std::make_pair(edge, std::int32_t(-1)));
    return it != X.pair1_by_birth.end() && it->first == edge ? it->second : -1;
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

// Dense ranks of one image (float32 stays float32); superlevel filtrations reverse
// them, so everything downstream is sublevel.
rank_t rank_image(const ImageView& im, std::int64_t n, bool superlevel, big_vector<rank_t>& out) {
    const rank_t num = im.dtype == DType::Float32 ? dense_ranks(static_cast<const float*>(im.data), n, out)
                                                  : dense_ranks(static_cast<const double*>(im.data), n, out);
    if (superlevel)
        for (auto& r : out) r = num - 1 - r;
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
                       bool intersection, big_vector<rank_t>& out) {
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
// keep_subs: keep the sorted (d-1)-cells (a prepared target needs them in every
// matching); otherwise they are freed once the top dimension is done.
void prepare_complex(Complex& X, const Lattice& P, const ImageView& im, const Options& opt, bool keep_subs) {
    big_vector<rank_t> r;
    const rank_t num = rank_image(im, P.points, opt.superlevel, r);
    make_filtration(X.F, P, std::move(r), num, opt.construction);
    sort_cells(X);
    const int d = X.F.dim();
    top_dimension(X.F, sub_cells(X), nullptr, nullptr, X.top, d == 3);
    if (d == 3 && !keep_subs) big_vector<key_t>().swap(X.subs);
    if (d == 3) own_dim1(X, row_order(X.F.L, X.F.f, X.edges));
    dimension0(X.F, X.edges, X.dim0);
}

// Intersection comparison H: now H is contained in X at every step, so the roles of
// the union case swap: X's own order is walked (codomain) carrying H's elders
// (domain). For every non-trivial pair of X, in the order of X.dim0.pairs, the index of
// the H pair born at the H-younger vertex (or -1).
std::vector<std::int32_t> dimension0_into(const Filtration& X, const big_vector<key_t>& edges, const Filtration& H,
                                          const Dim0& h0) {
    return host::dim0_into(X.L, edges.size(), keys_of(edges), X.v.data(), H.v.data(), h0.pair_of_birth.data());
}

// Pairs of X matched to pairs of H through the image of H -> X (intersection), per
// dimension: out[k][i] = index of the H pair matched with X's i-th pair, or -1.
// RH = row_order of H's edges.
std::vector<std::vector<std::int32_t>> into_comparison(const Complex& X, const Complex& H, const RowOrder* RH) {
    const int d = X.F.dim();
    std::vector<std::vector<std::int32_t>> out(d);
    out[0] = dimension0_into(X.F, X.edges, H.F, H.dim0);
    if (d == 3) {
        big_vector<std::uint32_t> pivot;
        reduce_dim1(X.F.L, *RH, X.top.columns, pivot);
        for (std::size_t q = 0; q < X.pairs1.size(); ++q) {
            const std::uint32_t e = pivot[X.pair1_column[q]];
            out[1].push_back(e == kNone ? -1 : pair1_of_birth(H, e));
        }
    }
    big_vector<std::int32_t> match_top;
    TopDim unused;
    top_dimension(H.F, sub_cells(H), &X.F, &match_top, unused, false);
    for (const CellPair& p : X.top.pairs) out[d - 1].push_back(match_top[p.death_cell]);
    return out;
}

// Voxel coordinates of matched and unmatched pairs; matches[k] holds (index in a's
// pairs, index in b's pairs) of dimension k.
MatchingResult assemble(const Complex& X0, const Complex& X1, const host::Matches& matches, const Options& opt) {
    const int d = X0.F.dim();
    auto pairs_of = [d](const Complex& X) {
        return [&X, d](int k) -> const std::vector<CellPair>& {
            return k == 0 ? X.dim0.pairs : k == d - 1 ? X.top.pairs : X.pairs1;
        };
    };
    auto report_with = [d](const Reporter& rep) {
        return [&rep, d](const std::vector<std::uint64_t>& cells, int k, VoxelPairs& out) {
            std::int64_t c[3];
            for (std::size_t i = 0; i + 1 < cells.size(); i += 2) {
                rep.report(k, cells[i], c);
                out.birth.insert(out.birth.end(), c, c + d);
                rep.report(k + 1, cells[i + 1], c);
                out.death.insert(out.death.end(), c, c + d);
            }
        };
    };
    const Reporter rep0{X0.F}, rep1{X1.F};
    return host::assemble_matching(d, pairs_of(X0), pairs_of(X1), matches, opt, report_with(rep0), report_with(rep1));
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
    prepare_complex(prep->X, P, image, opt, true);
    prep->options = opt;
    prep->ndim = image.ndim;
    for (int a = 0; a < 3; ++a) prep->shape[a] = image.shape[a];
    return prep;
}

std::size_t prepared_bytes(const PreparedImage& p) {
    const Complex& X = p.X;
    auto sz = [](const auto& v) { return v.capacity() * sizeof(v[0]); };
    return sz(X.F.v) + sz(X.F.e) + sz(X.F.f) + sz(X.F.c) + sz(X.F.pix) + sz(X.edges) + sz(X.subs) +
           sz(X.top.pairs) + sz(X.pairs1) + sz(X.pair1_by_birth) + sz(X.pair1_column) + sz(X.dim0.pairs) +
           sz(X.dim0.pair_of_birth) + sizeof(PreparedImage);
}

// ---------------------------------------------------------------------------------

BarcodeResult compute_barcode(const ImageView& image, const Options& opt) {
    const Lattice P = image_lattice(image);
    check_size(P);
    Complex X;
    prepare_complex(X, P, image, opt, false);
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
    // Filtration and sorted cells of one image (ranks_of fills the dense ranks).
    auto filtration = [&](Complex& X, const std::function<rank_t(big_vector<rank_t>&)>& ranks_of) {
        big_vector<rank_t> r;
        const rank_t num = ranks_of(r);
        make_filtration(X.F, P, std::move(r), num, opt.construction);
        sort_cells(X);
    };
    auto own_ranks = [&](const ImageView& im) {
        return [&](big_vector<rank_t>& r) { return rank_image(im, P.points, opt.superlevel, r); };
    };
    auto comparison_ranks = [&](big_vector<rank_t>& r) {
        return rank_comparison(a, b, P.points, opt.superlevel, opt.intersection, r);
    };
    host::Matches matches;
    if (opt.intersection) {
        // Every image has its own barcode; a and b are matched when they are matched
        // with the same pair of the intersection H.
        Complex H;
        RowOrder RH;
        std::vector<std::function<void()>> tasks = {
            [&] {
                filtration(H, comparison_ranks);
                top_dimension(H.F, sub_cells(H), nullptr, nullptr, H.top, H.F.dim() == 3);
                if (H.F.dim() == 3) {
                    RH = row_order(H.F.L, H.F.f, H.edges);
                    own_dim1(H, RH);
                }
                dimension0(H.F, H.edges, H.dim0);
            },
            [&] { prepare_complex(X0, P, a, opt, false); },
        };
        if (!prepared_b) tasks.push_back([&] { prepare_complex(X1_local, P, b, opt, false); });
        run_tasks(tasks, threads);
        std::vector<std::vector<std::int32_t>> to_h0, to_h1;
        std::vector<std::function<void()>> more = {
            [&] { to_h0 = into_comparison(X0, H, &RH); },
            [&] { to_h1 = into_comparison(X1, H, &RH); },
        };
        run_tasks(more, threads);
        const int d = X0.F.dim();
        matches.resize(d);
        for (int k = 0; k < d; ++k) {
            const std::size_t nh = k == 0 ? H.dim0.pairs.size() : k == d - 1 ? H.top.pairs.size() : H.pairs1.size();
            matches[k] = host::matched_through(to_h0[k], to_h1[k], nh);
        }
        return assemble(X0, X1, matches, opt);
    }
    // Union comparison C, as a task graph. The target's own barcode (filtration, top
    // pairs, dimension 1 and 0) is independent of the prediction and is skipped when it
    // is prepared (cached). The top-dimension passes over a and b carry C's labels
    // (image persistence into C) and give a's (and a fresh b's) own pairs and columns.
    // The (d-1)-cells serve the top dimension only and are freed right after it.
    const int d = P.ndim;
    const bool fresh_b = !prepared_b;
    auto free_subs = [d](Complex& X) {
        if (d == 3) big_vector<key_t>().swap(X.subs);
    };
    big_vector<std::int32_t> match_top0, match_top1;
    TopDim top1_again;  // a prepared b's top pairs once more, now with C's labels
    RowOrder R0, R1, RC;  // rows of the dimension-1 reductions: a's serve a's own and a -> C
    big_vector<std::uint32_t> image_pivot0, image_pivot1;
    std::vector<std::pair<std::uint32_t, std::uint32_t>> image_births0;
    TaskGraph g;
    const int fc = g.add("filtration comparison", [&] { filtration(C, comparison_ranks); });
    const int fa = g.add("filtration a", [&] { filtration(X0, own_ranks(a)); });
    const int fb = fresh_b ? g.add("filtration b", [&] { filtration(X1_local, own_ranks(b)); }) : -1;
    const int tc = g.add("top comparison", [&] {
        top_dimension(C.F, sub_cells(C), nullptr, nullptr, C.top, d == 3);
        free_subs(C);
    }, {fc});
    const int ta = g.add("top a (into comparison)", [&] {
        top_dimension(X0.F, sub_cells(X0), &C.F, &match_top0, X0.top, d == 3);
        free_subs(X0);
    }, {fc, fa});
    const int tb = g.add("top b (into comparison)", [&] {
        if (prepared_b) {
            top_dimension(X1.F, sub_cells(X1), &C.F, &match_top1, top1_again, false);
        } else {
            top_dimension(X1_local.F, sub_cells(X1_local), &C.F, &match_top1, X1_local.top, d == 3);
            free_subs(X1_local);
        }
    }, {fc, fb});
    if (d == 3) {
        const int ra = g.add("rows a", [&] { R0 = row_order(X0.F.L, X0.F.f, X0.edges); }, {fa});
        const int rb = g.add("rows b", [&] { R1 = row_order(X1.F.L, X1.F.f, X1.edges); }, {fb});
        const int rc = g.add("rows comparison", [&] { RC = row_order(C.F.L, C.F.f, C.edges); }, {fc});
        g.add("dim1 image a", [&] { reduce_dim1(C.F.L, R0, C.top.columns, image_pivot0); }, {tc, ra});
        g.add("dim1 image b", [&] { reduce_dim1(C.F.L, R1, C.top.columns, image_pivot1); }, {tc, rb});
        g.add("dim1 a", [&] { own_dim1(X0, R0); }, {ta, ra});
        g.add("dim1 comparison", [&] { own_dim1(C, RC); }, {tc, rc});
        if (fresh_b) g.add("dim1 b", [&] { own_dim1(X1_local, R1); }, {tb, rb});
    }
    g.add("dim0 a", [&] { dimension0(X0.F, X0.edges, X0.dim0); }, {fa});
    if (fresh_b) g.add("dim0 b", [&] { dimension0(X1_local.F, X1_local.edges, X1_local.dim0); }, {fb});
    g.add("dim0 comparison+images", [&] { image_births0 = dimension0_image(C.F, X0.F, X1.F, C.edges); },
          {fc, fa, fb});
    g.run(threads, timer);

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
            const std::int32_t i0 = pair1_of_birth(X0, e0), i1 = pair1_of_birth(X1, e1);
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
