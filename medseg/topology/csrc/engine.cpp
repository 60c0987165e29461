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
// of the ready tasks the one added first starts first (add long ones early). Tasks
// come in groups (begin_group; a batch's pairs, one group each): a thread keeps to the
// group of its last task, then takes a group no other thread is working on, and only
// then joins another thread's group; so threads work on pairs of their own, whose data
// stay in their core's caches, and help with another's when theirs has nothing ready.
// With the phase timer on, the tasks run one by one in the order they were added
// (dependencies always point to earlier tasks) and are timed one by one.
class TaskGraph {
  public:
    // Tasks added from now on form a new group.
    void begin_group() { ++group_; }

    int add(const char* name, std::function<void()> fn, std::initializer_list<int> deps = {}) {
        return add(name, std::move(fn), std::vector<int>(deps));
    }
    int add(const char* name, std::function<void()> fn, const std::vector<int>& deps) {
        const int id = static_cast<int>(tasks_.size());
        tasks_.push_back({name, std::move(fn), 0, {}, std::max(group_, 0)});
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
        std::vector<int> working(static_cast<std::size_t>(std::max(group_, 0)) + 1, 0);  // threads on each group
        // Where in `ready` the task for a thread last on group `mine` is (see the class).
        auto choose = [&](int mine) {
            const std::size_t n = ready.size();
            for (std::size_t k = n; k-- > 0;)
                if (tasks_[ready[k]].group == mine) return k;
            for (std::size_t k = n; k-- > 0;)
                if (working[tasks_[ready[k]].group] == 0) return k;
            return n - 1;
        };
        const std::function<void()> worker = [&]() {
            std::unique_lock<std::mutex> lock(mutex);
            int mine = -1;
            for (;;) {
                wake.wait(lock, [&] { return !ready.empty() || finished == tasks_.size() || error; });
                if (ready.empty() || error) return;
                const std::size_t at = choose(mine);
                const int id = ready[at];
                ready.erase(ready.begin() + static_cast<std::ptrdiff_t>(at));
                mine = tasks_[id].group;
                ++working[mine];
                lock.unlock();
                std::exception_ptr failed;
                try {
                    tasks_[id].fn();
                } catch (...) {
                    failed = std::current_exception();
                }
                lock.lock();
                --working[mine];
                ++finished;
                if (failed && !error) error = failed;
                for (int next : tasks_[id].dependents)
                    if (--tasks_[next].waiting == 0)
                        ready.insert(std::upper_bound(ready.begin(), ready.end(), next, std::greater<int>()), next);
                wake.notify_all();
            }
        };
        host::run_team(std::min<int>(threads, static_cast<int>(tasks_.size())), worker);
        if (error) std::rethrow_exception(error);
    }

  private:
    struct Task {
        const char* name;
        std::function<void()> fn;
        int waiting;
        std::vector<int> dependents;
        int group;
    };
    std::vector<Task> tasks_;
    int group_ = -1;  // the current group; tasks added before any begin_group are group 0
};

// ---------------------------------------------------------------------------------
// Radix sorts

// Stable LSD radix sort of n 64-bit words by bits [lo, hi), 11 bits a pass, tmp a
// buffer of n words; returns where the sorted words are (a or tmp). The counts of all
// digits come from one pass, and a digit that puts every word in one bucket is skipped.
constexpr int kDigitBits = 11;
constexpr std::uint64_t kDigitMask = (1u << kDigitBits) - 1;

key_t* radix_sort_u64(key_t* a, key_t* tmp, std::size_t n, int lo, int hi) {
    if (n < 2 || hi <= lo) return a;
    const int digits = (hi - lo + kDigitBits - 1) / kDigitBits;
    std::vector<std::size_t> count(static_cast<std::size_t>(digits) << kDigitBits, 0);
    for (std::size_t i = 0; i < n; ++i)
        for (int q = 0; q < digits; ++q)
            ++count[(std::size_t(q) << kDigitBits) + ((a[i] >> (lo + q * kDigitBits)) & kDigitMask)];
    for (int q = 0; q < digits; ++q) {
        const int shift = lo + q * kDigitBits;
        std::size_t* c = count.data() + (std::size_t(q) << kDigitBits);
        if (c[(a[0] >> shift) & kDigitMask] == n) continue;  // one bucket
        std::size_t sum = 0;
        for (std::size_t d = 0; d <= kDigitMask; ++d) {
            const std::size_t t = c[d];
            c[d] = sum;
            sum += t;
        }
        for (std::size_t i = 0; i < n; ++i) tmp[c[(a[i] >> shift) & kDigitMask]++] = a[i];
        std::swap(a, tmp);
    }
    return a;
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

// Dense ranks and order when the image holds at most two distinct values (binary masks
// and targets, the loss's case): one pass that checks the values and writes the ranks
// (already reversed for superlevel filtrations), one that writes the order. The same
// ranks and order as few_value_ranks + counting_order. Returns false, with `out` and
// `order` in an unspecified state, for more values.
template <class T>
bool two_value_ranks(const T* x, std::int64_t n, bool superlevel, big_vector<rank_t>& out,
                     big_vector<std::uint32_t>& order, rank_t& num) {
    const std::uint64_t u0 = order_bits(x[0]);
    std::int64_t first = 1;
    while (first < n && order_bits(x[first]) == u0) ++first;
    const std::uint64_t u1 = first < n ? order_bits(x[first]) : u0;
    num = first < n ? 2 : 1;
    // rank 1 is the value that comes second: the larger one (sublevel) or the smaller
    const std::uint64_t second = superlevel ? std::min(u0, u1) : std::max(u0, u1);
    out.resize(static_cast<std::size_t>(n));
    rank_t* r = out.data();
    std::size_t ones = 0;
    for (std::int64_t i = 0; i < n; ++i) {
        const std::uint64_t u = order_bits(x[i]);
        if (u != u0 && u != u1) return false;  // a third value: a prediction, found at once
        const rank_t one = num == 2 && u == second;
        r[i] = one;
        ones += one;
    }
    order.resize(static_cast<std::size_t>(n));
    std::uint32_t* o = order.data();
    std::size_t k0 = 0, k1 = static_cast<std::size_t>(n) - ones;
    for (std::int64_t i = 0; i < n; ++i) {
        if (r[i]) o[k1++] = static_cast<std::uint32_t>(i);
        else o[k0++] = static_cast<std::uint32_t>(i);
    }
    return true;
}

// The pixels by (rank, index) from their ranks (few of them): a counting sort.
void counting_order(const big_vector<rank_t>& ranks, rank_t num, big_vector<std::uint32_t>& order) {
    std::vector<std::size_t> start(static_cast<std::size_t>(num) + 1, 0);
    for (rank_t r : ranks) ++start[r + 1];
    for (rank_t r = 0; r < num; ++r) start[r + 1] += start[r];
    order.resize(ranks.size());
    for (std::size_t i = 0; i < ranks.size(); ++i) order[start[ranks[i]]++] = static_cast<std::uint32_t>(i);
}

// Dense ranks of one image (equal values, equal ranks) and its pixels in filtration
// order, i.e. by (rank, index). Superlevel filtrations reverse the ranks (the values
// are sorted by complemented order bits), so everything downstream is sublevel.
// Returns the number of distinct values.
template <class T>
rank_t dense_ranks(const T* x, std::int64_t n, bool superlevel, big_vector<rank_t>& out,
                   big_vector<std::uint32_t>& order) {
    if (n == 0) {
        out.clear();
        order.clear();
        return 0;
    }
    rank_t num = 0;
    if (two_value_ranks(x, n, superlevel, out, order, num)) return num;
    if (few_value_ranks(x, n, out, num)) {
        if (superlevel)
            for (auto& r : out) r = num - 1 - r;
        counting_order(out, num, order);
        return num;
    }
    const std::size_t total = static_cast<std::size_t>(n);
    out.resize(total);
    order.resize(total);
    std::uint64_t count = 0;
    big_buffer<key_t> buf(total), tmp(total);
    const std::uint64_t flip = superlevel ? ~0ull : 0;
    if (sizeof(T) == 4) {
        for (std::size_t i = 0; i < total; ++i)
            buf[i] = ((order_bits(x[i]) ^ flip) << 32) | static_cast<std::uint64_t>(i);
        const key_t* keys = radix_sort_u64(buf.data(), tmp.data(), total, 32, 64);
        std::uint64_t prev = ~0ull;
        for (std::size_t j = 0; j < total; ++j) {
            const std::uint64_t k = keys[j];
            count += (k >> 32) != prev;
            prev = k >> 32;
            out[k & 0xffffffffull] = static_cast<rank_t>(count - 1);
            order[j] = static_cast<std::uint32_t>(k);
        }
        return static_cast<rank_t>(count);
    }
    // Sort by the upper 32 bits of the 64-bit order key with the index packed in the
    // lower half (3 radix passes over 8-byte words instead of 6 over 16-byte records),
    // then order the rare runs that tie on the upper half by the full key (then index:
    // the order keeps ties by index).
    big_buffer<std::uint64_t> full(total);
    for (std::size_t i = 0; i < total; ++i) {
        full[i] = order_bits(x[i]) ^ flip;
        buf[i] = (full[i] & 0xffffffff00000000ull) | static_cast<std::uint64_t>(i);
    }
    key_t* keys = radix_sort_u64(buf.data(), tmp.data(), total, 32, 64);
    for (std::size_t s = 0; s < total;) {
        std::size_t e = s + 1;
        while (e < total && (keys[e] >> 32) == (keys[s] >> 32)) ++e;
        if (e - s > 1) {
            const std::uint64_t f0 = full[keys[s] & 0xffffffffull];
            bool same = true;
            for (std::size_t q = s + 1; q < e && same; ++q) same = full[keys[q] & 0xffffffffull] == f0;
            if (!same)
                std::sort(keys + s, keys + e, [&](std::uint64_t a, std::uint64_t b) {
                    const std::uint64_t fa = full[a & 0xffffffffull], fb = full[b & 0xffffffffull];
                    return fa < fb || (fa == fb && a < b);
                });
        }
        s = e;
    }
    bool first = true;
    std::uint64_t prev = 0;
    for (std::size_t j = 0; j < total; ++j) {
        const std::uint64_t k = keys[j];
        const std::uint64_t f = full[k & 0xffffffffull];
        count += first || f != prev;
        prev = f;
        first = false;
        out[k & 0xffffffffull] = static_cast<rank_t>(count - 1);
        order[j] = static_cast<std::uint32_t>(k);
    }
    return static_cast<rank_t>(count);
}

// The comparison image c (elementwise max or min of a and b) ranked from a's and b's
// ranking, without sorting c: every c_i is a_i or b_i, so the pixels where it is a_i,
// taken in a's order, are already in c's order (by value, then index), and so are the
// others in b's order; one merge of the two gives c's order. oa, ob: a's and b's
// orders, both of the same direction (superlevel: by decreasing value). Returns c's
// number of distinct values; ranks and order as dense_ranks of c gives them.
template <class T>
rank_t merged_ranks(const T* a, const T* b, std::size_t n, bool superlevel, bool take_max, const std::uint32_t* oa,
                    const std::uint32_t* ob, big_vector<rank_t>& out, big_vector<std::uint32_t>& order) {
    out.resize(n);
    order.resize(n);
    if (n == 0) return 0;
    // Whether c_i = a_i (else c_i = b_i); doubles also keep c's filtration key (order
    // bits, complemented for superlevel) for the comparisons.
    constexpr bool packed = sizeof(T) == 4;
    big_buffer<std::uint8_t> from_a(n);
    big_buffer<std::uint64_t> ck(packed ? 0 : n);
    for (std::size_t i = 0; i < n; ++i) {
        const T c = take_max ? std::max(a[i], b[i]) : std::min(a[i], b[i]);
        const std::uint64_t bits = order_bits(c);
        from_a[i] = bits == order_bits(a[i]);
        if (!packed) ck[i] = superlevel ? ~bits : bits;
    }
    // Each pixel as one word, in c's order when compared: for floats (key << 32) |
    // index, the 32-bit key read from the image c_i comes from (no key array: a's and
    // b's values, read in their own orders, are what c holds there); for doubles the
    // index, compared through ck.
    auto word = [&](const T* x, std::uint32_t i) -> std::uint64_t {
        if (!packed) return i;
        const std::uint32_t bits = static_cast<std::uint32_t>(order_bits(x[i]));
        return (static_cast<std::uint64_t>(superlevel ? ~bits : bits) << 32) | i;
    };
    auto before = [&](std::uint64_t x, std::uint64_t y) {
        if (packed) return x < y;
        return ck[x] < ck[y] || (ck[x] == ck[y] && x < y);
    };
    auto key_of = [&](std::uint64_t w) { return packed ? w >> 32 : ck[w]; };
    big_buffer<std::uint64_t> sa(n), sb(n), merged(n);
    std::size_t na = 0, nb = 0;
    constexpr std::size_t kAhead = 16;  // a's and b's orders visit the pixels at random
    for (std::size_t j = 0; j < n; ++j) {
        if (j + kAhead < n) {
            __builtin_prefetch(&a[oa[j + kAhead]]);
            __builtin_prefetch(&from_a[oa[j + kAhead]]);
            __builtin_prefetch(&b[ob[j + kAhead]]);
            __builtin_prefetch(&from_a[ob[j + kAhead]]);
        }
        sa[na] = word(a, oa[j]);
        na += from_a[oa[j]];
        sb[nb] = word(b, ob[j]);
        nb += !from_a[ob[j]];
    }
    std::size_t ia = 0, ib = 0, o = 0;
    while (ia < na && ib < nb) {
        const std::uint64_t x = sa[ia], y = sb[ib];
        const bool take_a = before(x, y);
        merged[o++] = take_a ? x : y;
        ia += take_a;
        ib += !take_a;
    }
    for (; ia < na; ++ia) merged[o++] = sa[ia];
    for (; ib < nb; ++ib) merged[o++] = sb[ib];
    std::uint64_t count = 0, prev = 0;
    for (std::size_t j = 0; j < n; ++j) {
        const std::uint64_t w = merged[j], key = key_of(w);
        const std::uint32_t i = static_cast<std::uint32_t>(w);
        count += j == 0 || key != prev;
        prev = key;
        out[i] = static_cast<rank_t>(count - 1);
        order[j] = i;
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
    big_vector<rank_t> v, e, f, c;  // 3D: c has one more entry, kInfRank (infinity); 2D V: no f (topr),
                                    // and no e where edges_from_vertices
    big_vector<std::uint32_t> order;  // the ranked points (V: v, T: pix) by (rank, index)
    big_vector<rank_t> topr;  // 2D: the squares' ranks by base point, kInfRank last (infinity)
    rank_t num_ranks = 0;

    int dim() const { return L.ndim; }
    // Top ranks by base point plus the point at infinity (the dual passes' vertices).
    const rank_t* top_ranks() const { return L.ndim == 3 ? c.data() : topr.data(); }
    key_t vkey(std::uint32_t l) const { return make_key(v[l], l); }
};

inline void other_axes(int t, int& u, int& w) {
    u = (t == 0) ? 1 : 0;
    w = (t == 2) ? 1 : 2;
}

// Sorting: at most this many ranks (masks, quantised images) take a counting sort of
// the stored cell ranks (sorted_keys); more take sorted_edges_V (V) or a radix sort.
constexpr rank_t kCountingSortRanks = 1u << 12;

// 2D V filtrations of many ranks (predictions, comparison images) keep no edge ranks:
// sorted_edges_V and the reporter read an edge's rank from its ends (the larger of the
// two), so the 3 slots per point (12 bytes, 3 MB for 512^2) are neither written nor
// read (the vertex ranks, a third of that, stay in cache where the edges did not).
bool edges_from_vertices(const Filtration& F) {
    return F.construction == Construction::V && F.L.ndim == 2 && F.num_ranks > kCountingSortRanks;
}

// 2D V: the edges along axes 0 and 1 exist (the third slot is kInfRank) and the squares
// with normal 2, built row by row in one pass. The squares go to topr alone, by base
// point: no f array of 3 slots per point (two of them empty), which the reporter reads
// through Cells::squares instead (7 % of a 256^2 matching: less to write and to cache).
// The edge ranks only where edges_from_vertices(F) is false.
void build_V_2d(Filtration& F) {
    const Lattice& L = F.L;
    const std::int64_t n0 = L.n[0], n1 = L.n[1], N = L.points;
    const bool store_edges = !edges_from_vertices(F);
    if (store_edges) F.e.resize(3 * N);
    F.topr.resize(N + 1);
    const rank_t* v = F.v.data();
    rank_t* e = F.e.data();
    for (std::int64_t x = 0; x < n0; ++x) {
        const bool down = x + 1 < n0;
        for (std::int64_t y = 0; y < n1; ++y) {
            const std::int64_t l = x * n1 + y;
            const bool right = y + 1 < n1;
            const rank_t r = v[l];
            if (store_edges) {
                e[3 * l] = down ? std::max(r, v[l + n1]) : kInfRank;
                e[3 * l + 1] = right ? std::max(r, v[l + 1]) : kInfRank;
                e[3 * l + 2] = kInfRank;
            }
            F.topr[l] = down && right ? std::max(std::max(r, v[l + 1]), std::max(v[l + n1], v[l + n1 + 1])) : kInfRank;
        }
    }
    F.topr[N] = kInfRank;
}

void build_edges_faces_cubes_V(Filtration& F) {
    const Lattice& L = F.L;
    const std::int64_t N = L.points;
    F.e.assign(3 * N, kInfRank);
    F.f.assign(3 * N, kInfRank);
    if (L.ndim == 3) F.c.assign(N + 1, kInfRank);
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
    if (L.ndim == 3) F.c.assign(N + 1, kInfRank);
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
big_vector<key_t> sorted_keys(const big_vector<rank_t>& ranks, rank_t num_ranks) {
    if (num_ranks <= 2) {  // masks: two runs, counted in registers (no counter in memory)
        const rank_t* r = ranks.data();
        const std::size_t n = ranks.size();
        std::size_t c0 = 0, c1 = 0;
        for (std::size_t i = 0; i < n; ++i) {
            c0 += r[i] == 0;
            c1 += r[i] == 1;
        }
        big_vector<key_t> keys(c0 + c1);
        key_t* k0 = keys.data();
        key_t* k1 = keys.data() + c0;
        for (std::size_t i = 0; i < n; ++i) {
            if (r[i] == 0) *k0++ = make_key(0, i);
            else if (r[i] == 1) *k1++ = make_key(1, i);
        }
        return keys;
    }
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
    big_vector<key_t> keys(count + 1);  // + 1: every cell is written, the missing ones overwritten
    std::size_t k = 0;
    for (std::size_t i = 0; i < ranks.size(); ++i) {
        keys[k] = make_key(ranks[i], i);
        k += ranks[i] != kInfRank;
    }
    keys.resize(count);
    big_buffer<key_t> tmp(count);
    const key_t* sorted = radix_sort_u64(keys.data(), tmp.data(), count, 32, 32 + bit_width(num_ranks));
    if (sorted != keys.data()) std::copy(sorted, sorted + count, keys.data());
    return keys;
}

// The sorted keys of the edges of a V-construction filtration, generated from its
// vertices in filtration order (F.order) rather than sorted: an edge's rank is the
// larger of its ends' ranks, so the edges of rank r are those at the vertices of rank r
// whose other end is not later. The edges at a vertex p come in key order as
// 3(p - s0) < 3(p - s1) + 1 < 3(p - s2) + 2 < 3p < 3p + 1 < 3p + 2 (strides s0 >= s1 >=
// s2), so a vertex alone at its rank (nearly every vertex of a noisy image) needs no
// sorting; the edges of tied vertices are listed by a scan of their range of cells when
// they are many and close, or else collected (an edge between two of them taken at its
// upper end only) and sorted. Same keys, same order as sorted_keys(F.e).
//
// EdgeRanks: rank(c) of the edge with packed index c (kInfRank: no such edge) and
// prefetch(q) of what rank() reads around vertex q: the stored ranks (StoredEdgeRanks)
// or, for 2D filtrations that keep none, the larger rank of the two ends (EdgeRanks2D).
// emit_alone(p, r, s, d, out): writes the keys of the edges of rank r at vertex p, alone
// at its rank, in key order (see above), and returns the new end of out.
struct StoredEdgeRanks {
    const rank_t* e;
    rank_t rank(std::uint32_t c) const { return e[c]; }
    key_t* emit_alone(std::uint32_t p, rank_t r, const std::uint32_t* s, int d, key_t* out) const {
        for (int t = 0; t < d; ++t)
            if (p >= s[t]) {
                const std::uint32_t c = 3 * (p - s[t]) + t;
                *out = make_key(r, c);
                out += e[c] == r;
            }
        for (int t = 0; t < d; ++t) {
            const std::uint32_t c = 3 * p + t;
            *out = make_key(r, c);
            out += e[c] == r;
        }
        return out;
    }
    void prefetch(std::uint32_t q, std::uint32_t s0) const {
        __builtin_prefetch(&e[3 * q]);
        if (q >= s0) __builtin_prefetch(&e[3 * (q - s0)]);
    }
};

struct EdgeRanks2D {
    const rank_t* v;
    std::uint32_t n1, points;  // row length, vertices
    rank_t rank(std::uint32_t c) const {
        const std::uint32_t q = c / 3, t = c % 3;
        if (t == 0) return q + n1 < points ? std::max(v[q], v[q + n1]) : kInfRank;  // down
        if (t == 1) return (q + 1) % n1 != 0 ? std::max(v[q], v[q + 1]) : kInfRank;  // right
        return kInfRank;
    }
    // an edge at p has rank r = v[p] when its other end is not later
    key_t* emit_alone(std::uint32_t p, rank_t r, const std::uint32_t*, int, key_t* out) const {
        const std::uint32_t col = p % n1;
        if (p >= n1) {
            *out = make_key(r, 3 * (p - n1));
            out += v[p - n1] <= r;
        }
        if (col != 0) {
            *out = make_key(r, 3 * (p - 1) + 1);
            out += v[p - 1] <= r;
        }
        if (p + n1 < points) {
            *out = make_key(r, 3 * p);
            out += v[p + n1] <= r;
        }
        if (col + 1 != n1) {
            *out = make_key(r, 3 * p + 1);
            out += v[p + 1] <= r;
        }
        return out;
    }
    void prefetch(std::uint32_t q, std::uint32_t s0) const {
        if (q >= s0) __builtin_prefetch(&v[q - s0]);
        if (q + s0 < points) __builtin_prefetch(&v[q + s0]);
    }
};

template <class EdgeRanks>
big_vector<key_t> sorted_edges_V_with(const Filtration& F, const EdgeRanks& er) {
    const Lattice& L = F.L;
    const int d = L.ndim;
    const std::size_t N = static_cast<std::size_t>(L.points);
    std::size_t count = 0;
    for (int t = 0; t < d; ++t) count += N / L.n[t] * (L.n[t] - 1);
    big_vector<key_t> keys(count + 1);  // + 1: a candidate is written before it is kept
    key_t* out = keys.data();
    const rank_t* v = F.v.data();
    const std::uint32_t* order = F.order.data();
    const std::uint32_t s[3] = {static_cast<std::uint32_t>(L.stride[0]), static_cast<std::uint32_t>(L.stride[1]),
                                static_cast<std::uint32_t>(L.stride[2])};
    std::vector<key_t> tied;
    constexpr std::size_t kAhead = 16;  // the vertices lie anywhere: their ranks are fetched ahead
    for (std::size_t i = 0; i < N;) {
        if (i + kAhead < N) {
            const std::uint32_t q = order[i + kAhead];
            __builtin_prefetch(&v[q]);
            er.prefetch(q, s[0]);
        }
        const std::uint32_t p = order[i];
        const rank_t r = v[p];
        std::size_t j = i + 1;
        while (j < N && v[order[j]] == r) ++j;
        if (j == i + 1) {
            out = er.emit_alone(p, r, s, d, out);
        } else if (3 * (std::size_t(order[j - 1] - order[i]) + s[0]) <= 16 * (j - i)) {
            // many tied vertices close together (a mask's level set in a comparison
            // image): every edge of rank r lies in this range of cells, so a scan of
            // it lists them in order
            const std::size_t lo = 3 * static_cast<std::size_t>(order[i] >= s[0] ? order[i] - s[0] : 0);
            const std::size_t hi = 3 * static_cast<std::size_t>(order[j - 1]) + 3;
            for (std::size_t c = lo; c < hi; ++c) {
                *out = make_key(r, c);
                out += er.rank(static_cast<std::uint32_t>(c)) == r;
            }
        } else {
            tied.clear();
            for (std::size_t q = i; q < j; ++q) {
                const std::uint32_t u = order[q];
                for (int t = 0; t < d; ++t)
                    if (u >= s[t] && er.rank(3 * (u - s[t]) + t) == r) tied.push_back(make_key(r, 3 * (u - s[t]) + t));
                for (int t = 0; t < d; ++t)
                    if (er.rank(3 * u + t) == r && v[u + s[t]] != r) tied.push_back(make_key(r, 3 * u + t));
            }
            std::sort(tied.begin(), tied.end());
            out = std::copy(tied.begin(), tied.end(), out);
        }
        i = j;
    }
    if (static_cast<std::size_t>(out - keys.data()) != count) throw std::logic_error("sorted_edges_V: edges lost");
    keys.resize(count);
    return keys;
}

big_vector<key_t> sorted_edges_V(const Filtration& F) {
    if (edges_from_vertices(F))
        return sorted_edges_V_with(F, EdgeRanks2D{F.v.data(), static_cast<std::uint32_t>(F.L.n[1]),
                                                  static_cast<std::uint32_t>(F.L.points)});
    return sorted_edges_V_with(F, StoredEdgeRanks{F.e.data()});
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
        if (!X.T && F.L.ndim == 2) X.squares = F.topr.data();  // 2D V keeps no f (build_V_2d)
        return X;
    }
};

// ---------------------------------------------------------------------------------
// Top dimension: union-find on the dual graph.

struct TopDim {
    std::vector<CellPair> pairs;   // (d-1)-cell, top cell
    big_vector<std::uint32_t> columns;  // (d-1)-cells that did not merge, in ascending key order
};

// X: the complex; sub_sorted: its (d-1)-cells ascending. If comp is given, the comp
// elder of every component is carried along (image persistence into comp) and
// match_top[comp-younger top cell] receives the index of X's pair. merges: X's merges
// are recorded (a prepared target replays them for every comparison, replay_top).
void top_dimension(const Filtration& X, const big_vector<key_t>& sub_sorted, const Filtration* comp,
                   big_vector<std::int32_t>* match_top, TopDim& out, bool keep_columns,
                   std::vector<host::TopMerge>* merges = nullptr) {
    const std::size_t n = sub_sorted.size();
    const bool scattered = X.num_ranks > 2;  // a mask's cells come in index order (host::kFetchAhead)
    if (keep_columns) out.columns.reserve(n);
    auto key_at = [&](std::size_t i) { return sub_sorted[n - 1 - i]; };
    auto on_column = [&](std::uint32_t cell) {
        if (keep_columns) out.columns.push_back(cell);
    };
    if (comp) {
        host::TopLabels labels(X.L.points, comp->top_ranks(), *match_top);
        host::top_pass(X.L, n, key_at, X.top_ranks(), out.pairs, [&](const host::TopMerge& m) { labels(m); },
                       on_column, [&](std::uint32_t x) { labels.prefetch(x); }, scattered);
    } else if (merges) {
        host::top_pass(X.L, n, key_at, X.top_ranks(), out.pairs,
                       [&](const host::TopMerge& m) { merges->push_back(m); }, on_column, host::NoFetch{}, scattered);
    } else {
        host::top_pass(X.L, n, key_at, X.top_ranks(), out.pairs, [](const host::TopMerge&) {}, on_column,
                       host::NoFetch{}, scattered);
    }
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

void dimension0(const Filtration& X, const big_vector<key_t>& edges, Dim0& out,
                big_vector<key_t>* unmerged = nullptr) {
    host::dim0_pass(X.L, edges.size(), keys_of(edges), X.v.data(), out.pairs, unmerged, X.num_ranks > 2);
    out.pair_of_birth = host::pairs_by_birth(out.pairs, static_cast<std::size_t>(X.L.points));
}

// The comparison's union-find carrying the elders of X0 and X1: for every non-trivial
// comparison pair, the X0- and X1-younger vertices.
std::vector<std::pair<std::uint32_t, std::uint32_t>> dimension0_image(const Filtration& C, const Filtration& X0,
                                                                      const Filtration& X1,
                                                                      const big_vector<key_t>& edges,
                                                                      big_vector<key_t>* unmerged = nullptr) {
    return host::image_births0(C.L, edges.size(), keys_of(edges), C.v.data(), X0.v.data(), X1.v.data(), unmerged);
}

// ---------------------------------------------------------------------------------
// Per-image work shared by barcodes and matchings

struct Complex {
    Filtration F;
    big_vector<key_t> edges;    // sorted
    big_vector<key_t> subs;     // 3D: sorted (d-1)-cells (in 2D these are the edges)
    TopDim top;
    big_vector<std::uint32_t> pivot1;  // 3D: pivot edge of each column of top.columns
    std::vector<CellPair> pairs1;       // 3D: (edge, square)
    std::vector<std::pair<std::uint32_t, std::int32_t>> pair1_by_birth;  // 3D: (edge, index in pairs1), by edge
    big_vector<std::uint32_t> pair1_column;   // 3D: column index of each pair
    Dim0 dim0;
    std::vector<host::TopMerge> top_merges;  // prepared targets: the top dimension's merges
    big_vector<key_t> unmerged0;  // 2D: the edges dimension 0 does not merge, ascending
};

// 2D: dimension 0 collects the edges it does not merge, the only ones that merge in the
// top dimension (host::top_pass), which then walks those alone; nullptr in 3D.
big_vector<key_t>* unmerged_edges(Complex& X) {
    if (X.F.dim() != 2) return nullptr;
    X.unmerged0.clear();
    X.unmerged0.reserve(X.edges.size() / 2 + 1);
    return &X.unmerged0;
}
// The (d-1)-cells the top dimension walks: 2D, those (after dimension 0).
const big_vector<key_t>& top_cells(const Complex& X) { return X.F.dim() == 2 ? X.unmerged0 : X.subs; }

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
                     big_vector<std::uint32_t>&& order, rank_t num_ranks, Construction construction) {
    F.construction = construction;
    F.num_ranks = num_ranks;
    F.order = std::move(order);
    if (construction == Construction::V) {
        F.L = pixels;
        F.v = std::move(ranks);
        if (pixels.ndim == 2) build_V_2d(F);
        else build_edges_faces_cubes_V(F);
    } else {
        F.pixels = pixels;
        F.pix = std::move(ranks);
        if (pixels.ndim == 2) F.L = Lattice(2, pixels.n[0] + 1, pixels.n[1] + 1, 1);
        else F.L = Lattice(3, pixels.n[0] + 1, pixels.n[1] + 1, pixels.n[2] + 1);
        check_size(F.L);
        build_T(F);
    }
    if (F.L.ndim == 2 && construction == Construction::T) {
        const std::int64_t N = F.L.points;
        F.topr.resize(N + 1);
        for (std::int64_t l = 0; l < N; ++l) F.topr[l] = F.f[3 * l + 2];
        F.topr[N] = kInfRank;
    }
}

void sort_cells(Complex& X) {
    const bool many = X.F.num_ranks > kCountingSortRanks;
    X.edges = many && X.F.construction == Construction::V ? sorted_edges_V(X.F) : sorted_keys(X.F.e, X.F.num_ranks);
    if (X.F.dim() == 3) X.subs = sorted_keys(X.F.f, X.F.num_ranks);
}


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

// Dense ranks of one image (float32 stays float32) and its pixels in filtration order.
rank_t rank_image(const ImageView& im, std::int64_t n, bool superlevel, big_vector<rank_t>& out,
                  big_vector<std::uint32_t>& order) {
    return im.dtype == DType::Float32 ? dense_ranks(static_cast<const float*>(im.data), n, superlevel, out, order)
                                      : dense_ranks(static_cast<const double*>(im.data), n, superlevel, out, order);
}

// Ranks and order of the comparison image: the union of the two filtrations (the
// elementwise value that enters first) or their intersection (the one that enters
// last), merged from the orders of a and b (oa, ob; see merged_ranks).
rank_t rank_comparison(const ImageView& a, const ImageView& b, std::int64_t n, bool superlevel, bool intersection,
                       const big_vector<std::uint32_t>& oa, const big_vector<std::uint32_t>& ob,
                       big_vector<rank_t>& out, big_vector<std::uint32_t>& order) {
    if (a.dtype != b.dtype) throw std::invalid_argument("both images must have the same dtype");
    const bool take_max = superlevel != intersection;
    const std::size_t total = static_cast<std::size_t>(n);
    if (a.dtype == DType::Float32)
        return merged_ranks(static_cast<const float*>(a.data), static_cast<const float*>(b.data), total, superlevel,
                            take_max, oa.data(), ob.data(), out, order);
    return merged_ranks(static_cast<const double*>(a.data), static_cast<const double*>(b.data), total, superlevel,
                        take_max, oa.data(), ob.data(), out, order);
}

// Everything about one image that does not depend on the other image of a matching:
// its filtration and sorted cells (own_filtration), and its own barcode (own_barcode).
void own_filtration(Complex& X, const Lattice& P, const ImageView& im, const Options& opt) {
    big_vector<rank_t> r;
    big_vector<std::uint32_t> order;
    const rank_t num = rank_image(im, P.points, opt.superlevel, r, order);
    make_filtration(X.F, P, std::move(r), std::move(order), num, opt.construction);
    sort_cells(X);
}

// prepared: record the merges of the top dimension, which every matching with this
// target (or with this intersection) replays against the other complex (replay_top)
// instead of a pass of its own. In 2D dimension 0 goes first: the edges it leaves are
// the top dimension's. The cells the top dimension walks are freed after it. rows: 3D,
// receives the row order of X's dimension-1 reduction.
void own_barcode(Complex& X, bool prepared, RowOrder* rows = nullptr) {
    const int d = X.F.dim();
    if (d == 2) dimension0(X.F, X.edges, X.dim0, unmerged_edges(X));
    top_dimension(X.F, top_cells(X), nullptr, nullptr, X.top, d == 3, prepared ? &X.top_merges : nullptr);
    big_vector<key_t>().swap(d == 3 ? X.subs : X.unmerged0);
    if (d == 3) {
        RowOrder local;
        RowOrder& R = rows ? *rows : local;
        R = row_order(X.F.L, X.F.f, X.edges);
        own_dim1(X, R);
        dimension0(X.F, X.edges, X.dim0);
    }
}

void prepare_complex(Complex& X, const Lattice& P, const ImageView& im, const Options& opt, bool prepared) {
    own_filtration(X, P, im, opt);
    own_barcode(X, prepared);
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
    host::replay_top(H.top_merges, static_cast<std::size_t>(H.F.L.points), X.F.top_ranks(), match_top);
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
    auto report_with = [d, flat = opt.flat_indices](const Reporter& rep) {
        return [&rep, d, flat](const std::vector<std::uint64_t>& cells, int k, VoxelPairs& out) {
            const std::size_t n = cells.size() / 2, at = out.birth.size(), width = flat ? 1 : d;
            out.birth.resize(at + n * width);
            out.death.resize(at + n * width);
            std::int64_t* birth = out.birth.data() + at;
            std::int64_t* death = out.death.data() + at;
            if (flat) {
                for (std::size_t i = 0; i < n; ++i) {
                    birth[i] = rep.rep.index(k, cells[2 * i]);
                    death[i] = rep.rep.index(k + 1, cells[2 * i + 1]);
                }
                return;
            }
            for (std::size_t i = 0; i < n; ++i) {
                std::int64_t c[3];
                rep.report(k, cells[2 * i], c);
                for (int q = 0; q < d; ++q) birth[i * d + q] = c[q];
                rep.report(k + 1, cells[2 * i + 1], c);
                for (int q = 0; q < d; ++q) death[i * d + q] = c[q];
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
    return sz(X.F.v) + sz(X.F.e) + sz(X.F.f) + sz(X.F.c) + sz(X.F.topr) + sz(X.F.order) + sz(X.F.pix) +
           sz(X.edges) + sz(X.subs) + sz(X.top.pairs) + sz(X.top.columns) + sz(X.pairs1) + sz(X.pair1_by_birth) +
           sz(X.pair1_column) + sz(X.dim0.pairs) + sz(X.dim0.pair_of_birth) + sz(X.top_merges) +
           sizeof(PreparedImage);
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

namespace {

void check_prepared(const ImageView& a, const Options& opt, const PreparedImage* prepared_b) {
    if (!prepared_b) return;
    const Options& po = prepared_b->options;
    if (po.superlevel != opt.superlevel || po.construction != opt.construction || prepared_b->ndim != a.ndim ||
        !std::equal(a.shape, a.shape + 3, prepared_b->shape))
        throw std::invalid_argument("prepared target does not fit this prediction or these options");
}

// Filtration and sorted cells of the comparison image of a and b, ranked from the
// orders of X0 (a's) and X1 (b's).
void comparison_filtration(Complex& X, const Lattice& P, const ImageView& a, const ImageView& b, const Options& opt,
                           const Complex& X0, const Complex& X1) {
    big_vector<rank_t> r;
    big_vector<std::uint32_t> order;
    const rank_t num = rank_comparison(a, b, P.points, opt.superlevel, opt.intersection, X0.F.order, X1.F.order, r,
                                       order);
    make_filtration(X.F, P, std::move(r), std::move(order), num, opt.construction);
    sort_cells(X);
}

// Intersection comparison: every image has its own barcode; a and b are matched when
// they are matched with the same pair of the intersection H.
MatchingResult intersection_matching(const ImageView& a, const ImageView& b, const Options& opt,
                                     const PreparedImage* prepared_b) {
    const Lattice P = image_lattice(a);
    const int threads = std::max(1, opt.threads);
    Complex X0, X1_local, H;
    const Complex& X1 = prepared_b ? prepared_b->X : X1_local;
    RowOrder RH;
    std::vector<std::function<void()>> filtrations = {[&] { own_filtration(X0, P, a, opt); }};
    if (!prepared_b) filtrations.push_back([&] { own_filtration(X1_local, P, b, opt); });
    run_tasks(filtrations, threads);
    std::vector<std::function<void()>> tasks = {
        [&] {
            comparison_filtration(H, P, a, b, opt, X0, X1);
            own_barcode(H, true, &RH);
        },
        [&] { own_barcode(X0, false); },
    };
    if (!prepared_b) tasks.push_back([&] { own_barcode(X1_local, false); });
    run_tasks(tasks, threads);
    std::vector<std::vector<std::int32_t>> to_h0, to_h1;
    std::vector<std::function<void()>> more = {
        [&] { to_h0 = into_comparison(X0, H, &RH); },
        [&] { to_h1 = into_comparison(X1, H, &RH); },
    };
    run_tasks(more, threads);
    const int d = X0.F.dim();
    host::Matches matches(d);
    for (int k = 0; k < d; ++k) {
        const std::size_t nh = k == 0 ? H.dim0.pairs.size() : k == d - 1 ? H.top.pairs.size() : H.pairs1.size();
        matches[k] = host::matched_through(to_h0[k], to_h1[k], nh);
    }
    return assemble(X0, X1, matches, opt);
}

// The Betti matching of a and b with the union as comparison C, as tasks of a task
// graph: add_tasks puts the pair's tasks into a graph (one pair's own, or a batch's
// shared by all its pairs, so that threads left idle by one pair take another's tasks),
// and after the graph has run, result() is the matching. The target's own barcode
// (filtration, top pairs, dimension 1 and 0) is independent of the prediction and is
// skipped when it is prepared (cached). The top-dimension passes over a and b carry C's
// labels (image persistence into C) and give a's (and a fresh b's) own pairs and
// columns; a prepared b replays its recorded merges instead. The (d-1)-cells the top
// dimension walks are freed right after it. Holds references to a, b and prepared_b.
class UnionMatching {
  public:
    UnionMatching(const ImageView& a, const ImageView& b, const Options& opt, const PreparedImage* prepared_b)
        : a_(a), b_(b), opt_(opt), prepared_b_(prepared_b), P_(image_lattice(a)), d_(P_.ndim),
          X1_(prepared_b ? prepared_b->X : X1_local_) {}
    UnionMatching(const UnionMatching&) = delete;
    UnionMatching& operator=(const UnionMatching&) = delete;

    // Adds the pair's tasks to g, its first ones after task `after` (-1: none), and
    // returns the id of its last task (the matching assembled).
    int add_tasks(TaskGraph& g, int after) {
        const bool fresh_b = !prepared_b_;
        const int fa = g.add("filtration a", [this] { own_filtration(X0_, P_, a_, opt_); }, {after});
        const int fb = fresh_b ? g.add("filtration b", [this] { own_filtration(X1_local_, P_, b_, opt_); }, {after})
                               : -1;
        const int fc = g.add("filtration comparison",
                             [this] { comparison_filtration(C_, P_, a_, b_, opt_, X0_, X1_); }, {fa, fb});
        // 2D: dimension 0 first, the edges it leaves are the top dimension's (the tops
        // wait for it); 3D: the tops first, they lead to the longer dimension 1.
        int da = -1, db = -1, dc = -1;
        std::vector<int> last;
        auto add_dim0 = [&] {
            da = g.add("dim0 a", [this] { dimension0(X0_.F, X0_.edges, X0_.dim0, unmerged_edges(X0_)); }, {fa});
            if (fresh_b)
                db = g.add("dim0 b", [this] {
                    dimension0(X1_local_.F, X1_local_.edges, X1_local_.dim0, unmerged_edges(X1_local_));
                }, {fb});
            dc = g.add("dim0 comparison+images", [this] {
                image_births0_ = dimension0_image(C_.F, X0_.F, X1_.F, C_.edges, unmerged_edges(C_));
            }, {fc, fa, fb});
            last.insert(last.end(), {da, db, dc});
        };
        if (d_ == 2) add_dim0();
        const int tc = g.add("top comparison", [this] {
            top_dimension(C_.F, top_cells(C_), nullptr, nullptr, C_.top, d_ == 3);
            free_subs(C_);
        }, {fc, dc});
        const int ta = g.add("top a (into comparison)", [this] {
            top_dimension(X0_.F, top_cells(X0_), &C_.F, &match_top0_, X0_.top, d_ == 3);
            free_subs(X0_);
        }, {fc, fa, da});
        const int tb = g.add("top b (into comparison)", [this] {
            if (prepared_b_) {
                host::replay_top(X1_.top_merges, static_cast<std::size_t>(C_.F.L.points), C_.F.top_ranks(),
                                 match_top1_);
            } else {
                top_dimension(X1_local_.F, top_cells(X1_local_), &C_.F, &match_top1_, X1_local_.top, d_ == 3);
                free_subs(X1_local_);
            }
        }, {fc, fb, db});
        last.insert(last.end(), {tc, ta, tb});
        if (d_ == 3) {
            const int ra = g.add("rows a", [this] { R0_ = row_order(X0_.F.L, X0_.F.f, X0_.edges); }, {fa});
            const int rb = g.add("rows b", [this] { R1_ = row_order(X1_.F.L, X1_.F.f, X1_.edges); }, {fb, after});
            const int rc = g.add("rows comparison", [this] { RC_ = row_order(C_.F.L, C_.F.f, C_.edges); }, {fc});
            last.push_back(g.add("dim1 image a", [this] { reduce_dim1(C_.F.L, R0_, C_.top.columns, image_pivot0_); },
                                 {tc, ra}));
            last.push_back(g.add("dim1 image b", [this] { reduce_dim1(C_.F.L, R1_, C_.top.columns, image_pivot1_); },
                                 {tc, rb}));
            last.push_back(g.add("dim1 a", [this] { own_dim1(X0_, R0_); }, {ta, ra}));
            last.push_back(g.add("dim1 comparison", [this] { own_dim1(C_, RC_); }, {tc, rc}));
            if (fresh_b) last.push_back(g.add("dim1 b", [this] { own_dim1(X1_local_, R1_); }, {tb, rb}));
            add_dim0();
        }
        return g.add("matching + coordinates", [this] {
            result_ = assemble_matches();
            release();
        }, last);
    }

    MatchingResult result() { return std::move(result_); }

  private:
    void free_subs(Complex& X) const { big_vector<key_t>().swap(d_ == 3 ? X.subs : X.unmerged0); }

    // The working memory back to the cache of blocks (big_vector.hpp) as soon as the
    // result is assembled: the next pair this thread takes reuses blocks that are still
    // in its caches (holding every pair's arrays to the end of a batch of 8 256² pairs
    // made it 6 % slower).
    void release() {
        X0_ = Complex();
        C_ = Complex();
        X1_local_ = Complex();
        match_top0_ = {};
        match_top1_ = {};
        R0_ = {};
        R1_ = {};
        RC_ = {};
        image_pivot0_ = {};
        image_pivot1_ = {};
        std::vector<std::pair<std::uint32_t, std::uint32_t>>().swap(image_births0_);
    }

    // Matchings per dimension, (index in X0's pairs, index in X1's pairs), and the
    // result's coordinates.
    MatchingResult assemble_matches() {
        host::Matches matches(d_);
        for (auto& [y0, y1] : image_births0_) {
            const std::int32_t i0 = X0_.dim0.pair_of_birth[y0], i1 = X1_.dim0.pair_of_birth[y1];
            if (i0 >= 0 && i1 >= 0) matches[0].emplace_back(i0, i1);
        }
        if (d_ == 3) {
            for (std::size_t q = 0; q < C_.pairs1.size(); ++q) {
                const std::uint32_t col = C_.pair1_column[q];
                const std::uint32_t e0 = image_pivot0_[col], e1 = image_pivot1_[col];
                if (e0 == kNone || e1 == kNone) continue;
                const std::int32_t i0 = pair1_of_birth(X0_, e0), i1 = pair1_of_birth(X1_, e1);
                if (i0 >= 0 && i1 >= 0) matches[1].emplace_back(i0, i1);
            }
        }
        for (const CellPair& p : C_.top.pairs) {
            const std::int32_t i0 = match_top0_[p.death_cell], i1 = match_top1_[p.death_cell];
            if (i0 >= 0 && i1 >= 0) matches[d_ - 1].emplace_back(i0, i1);
        }
        return assemble(X0_, X1_, matches, opt_);
    }

    const ImageView a_, b_;
    const Options opt_;
    const PreparedImage* prepared_b_;
    const Lattice P_;
    const int d_;
    Complex X0_, C_, X1_local_;
    const Complex& X1_;
    big_vector<std::int32_t> match_top0_, match_top1_;
    RowOrder R0_, R1_, RC_;  // rows of the dimension-1 reductions: a's serve a's own and a -> C
    big_vector<std::uint32_t> image_pivot0_, image_pivot1_;
    std::vector<std::pair<std::uint32_t, std::uint32_t>> image_births0_;
    MatchingResult result_;
};

}  // namespace

MatchingResult compute_matching(const ImageView& a, const ImageView& b, const Options& opt,
                                const PreparedImage* prepared_b) {
    check_size(image_lattice(a));
    check_prepared(a, opt, prepared_b);
    if (opt.intersection) return intersection_matching(a, b, opt, prepared_b);
    PhaseTimer timer;
    UnionMatching m(a, b, opt, prepared_b);
    TaskGraph g;
    m.add_tasks(g, -1);
    g.run(std::max(1, opt.threads), timer);
    return m.result();
}

std::vector<MatchingResult> compute_matchings(const std::vector<ImageView>& as, const std::vector<ImageView>& bs,
                                              const std::vector<const PreparedImage*>& prepared, const Options& opt,
                                              int threads) {
    const std::size_t n = as.size();
    threads = std::max(1, threads);
    auto prepared_of = [&prepared](std::size_t i) { return prepared.empty() ? nullptr : prepared[i]; };
    std::vector<MatchingResult> out(n);
    if (opt.intersection || n < 2 || threads < 2) {  // pairs on threads, each whole
        std::vector<std::function<void()>> jobs;
        for (std::size_t i = 0; i < n; ++i)
            jobs.push_back([&, i] {
                Options o = opt;
                o.threads = host::threads_of_job(i, n, threads);
                out[i] = compute_matching(as[i], bs[i], o, prepared_of(i));
            });
        run_tasks(jobs, threads);
        return out;
    }
    for (std::size_t i = 0; i < n; ++i) {
        check_size(image_lattice(as[i]));
        check_prepared(as[i], opt, prepared_of(i));
    }
    // One graph for the batch, a group of tasks per pair: each thread works on a pair of
    // its own and takes another's ready tasks when its pair has none (TaskGraph). A
    // pair's first tasks wait for the pair `threads` places before it to finish, so
    // that at most `threads` pairs hold working memory at once (as many as when each
    // thread takes a pair).
    std::vector<std::unique_ptr<UnionMatching>> jobs;
    TaskGraph g;
    std::vector<int> last(n);
    for (std::size_t i = 0; i < n; ++i) {
        jobs.push_back(std::make_unique<UnionMatching>(as[i], bs[i], opt, prepared_of(i)));
        g.begin_group();
        last[i] = jobs[i]->add_tasks(g, i >= static_cast<std::size_t>(threads) ? last[i - threads] : -1);
    }
    PhaseTimer timer;
    g.run(threads, timer);
    for (std::size_t i = 0; i < n; ++i) out[i] = jobs[i]->result();
    return out;
}

}  // namespace medseg
