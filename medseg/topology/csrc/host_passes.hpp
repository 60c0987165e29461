// Host-side passes shared by the sequential engine (engine.cpp) and the host steps of
// the data-parallel backend (matching_parallel.hpp): the elder-rule union-finds of
// dimensions 0 and d-1 (own and image persistence), the dimension-1 column reduction,
// and small helpers (phase timings, a task pool).
//
// The union-find passes read the cells of one dimension in filtration order through
// key_at(i), i < count. The sequential engine hands them every cell and they skip those
// that merge nothing; the data-parallel backend hands them only its spanning-forest
// cells, which are exactly the cells that merge (CUDA.md), so both backends make the
// same pairs in the same order from the same code.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <dlfcn.h>
#include <pthread.h>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "big_vector.hpp"
#include "cells.hpp"

namespace medseg {
namespace host {

// Phase timings on stderr when MEDSEG_TOPOLOGY_PROFILE is set (development aid).
struct PhaseTimer {
    const char* prefix = "";
    bool on = std::getenv("MEDSEG_TOPOLOGY_PROFILE") != nullptr;
    std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
    void mark(const char* what) {
        if (!on) return;
        const auto now = std::chrono::steady_clock::now();
        std::fprintf(stderr, "[medseg.topology] %s%-28s %8.1f ms\n", prefix, what,
                     std::chrono::duration<double, std::milli>(now - t).count());
        t = now;
    }
};

// The OpenMP runtime the process has already loaded (PyTorch's libgomp), for run_team.
//
// Why the engine runs its threads there: PyTorch's CPU ops leave their OpenMP workers
// spinning for a while after each parallel region (libgomp's default wait policy), so
// threads of our own find the cores taken. Measured on 2 cores, a Betti matching term
// right after torch's ops: 52 ms on threads of its own, 47 ms as a parallel region of
// torch's runtime, whose spinning workers take the work at once (the same as with
// OMP_WAIT_POLICY=PASSIVE, which slows the network's own step by about 4 %).
// The region is entered through GOMP_parallel (the ABI of libgomp, which LLVM's and
// Intel's runtimes also export), looked up at run time: the engine neither links an
// OpenMP runtime nor loads a second one.
//
// libgomp cannot start a team in a child forked after the parent used one (the
// child's pool names threads that fork did not copy: it hangs, as PyTorch's own ops do
// there), so no team is used
//  - after a fork of a process that had loaded the engine (pthread_atfork below),
//  - in a process whose engine was switched off it (set_enabled(false): medseg does
//    so in multiprocessing's children and after os.fork, medseg/topology/_inputs.py),
//  - where the runtime's thread count is 1 (PyTorch sets it in DataLoader workers).
// Nor for more threads than the runtime's count (torch.get_num_threads()): the team's
// extra threads would stay in the pool and spin after every region of torch's.
// MEDSEG_ENGINE_OWN_THREADS=1 forces threads of our own (comparisons).
class HostOpenMP {
  public:
    using Parallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

    static HostOpenMP& get() {
        static HostOpenMP instance;
        return instance;
    }

    void set_enabled(bool enabled) { enabled_.store(enabled, std::memory_order_relaxed); }

    // GOMP_parallel where a team of `threads` of the loaded runtime can be used now, else
    // nullptr.
    Parallel usable(int threads) {
        if (!enabled_.load(std::memory_order_relaxed) || std::getenv("MEDSEG_ENGINE_OWN_THREADS")) return nullptr;
        Parallel parallel = parallel_.load(std::memory_order_relaxed);
        if (!parallel) {  // looked up until found: torch may load after the engine
            for (const char* lib : {"libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.so.5"}) {
                void* handle = dlopen(lib, RTLD_NOW | RTLD_NOLOAD);
                if (!handle) continue;
                parallel = reinterpret_cast<Parallel>(dlsym(handle, "GOMP_parallel"));
                max_threads_.store(reinterpret_cast<MaxThreads>(dlsym(handle, "omp_get_max_threads")));
                dlclose(handle);  // drops the reference NOLOAD took; torch keeps the library
                if (parallel) break;
            }
            if (!parallel) return nullptr;
            parallel_.store(parallel, std::memory_order_relaxed);
        }
        const MaxThreads max_threads = max_threads_.load(std::memory_order_relaxed);
        const int runtime_threads = max_threads ? max_threads() : threads;
        return runtime_threads >= 2 && runtime_threads >= threads ? parallel : nullptr;
    }

  private:
    using MaxThreads = int (*)();

    HostOpenMP() {
        pthread_atfork(nullptr, nullptr, [] { get().set_enabled(false); });
    }

    std::atomic<bool> enabled_{true};
    std::atomic<Parallel> parallel_{nullptr};
    std::atomic<MaxThreads> max_threads_{nullptr};
};

// Whether this thread is running a worker of run_team (a team member).
inline thread_local bool in_team = false;

// worker() on `threads` threads, the caller's among them; returns when all have
// returned: a parallel region of the process's OpenMP runtime where HostOpenMP allows
// one, else threads of our own. A team member's own run_team (a pair's task graph
// inside the batch's team, when the pairs are fewer than the threads) starts threads of
// its own: the runtime would run a nested region on one thread.
inline void run_team(int threads, const std::function<void()>& worker) {
    if (threads <= 1) {
        worker();
        return;
    }
    const std::function<void()> member = [&worker] {
        struct Flag {
            bool outer = in_team;
            Flag() { in_team = true; }
            ~Flag() { in_team = outer; }
        } flag;
        worker();
    };
    if (HostOpenMP::Parallel parallel = in_team ? nullptr : HostOpenMP::get().usable(threads)) {
        parallel([](void* w) { (*static_cast<const std::function<void()>*>(w))(); },
                 const_cast<std::function<void()>*>(&member), static_cast<unsigned>(threads), 0);
        return;
    }
    std::vector<std::thread> pool;
    for (int i = 1; i < threads; ++i) pool.emplace_back(member);
    member();
    for (auto& th : pool) th.join();
}

// How many of `threads` threads each of `jobs` jobs gets when they run side by side
// (run_tasks with one task per job): one each when the jobs are at least as many, else
// the threads split as evenly as the division allows (the first jobs get one more).
inline int threads_of_job(std::size_t job, std::size_t jobs, int threads) {
    const std::size_t t = static_cast<std::size_t>(std::max(1, threads));
    if (jobs == 0 || jobs >= t) return 1;
    return static_cast<int>(t / jobs + (job < t % jobs ? 1 : 0));
}

// Runs independent tasks on up to `threads` threads; the first exception is rethrown
// once all have stopped.
inline void run_tasks(std::vector<std::function<void()>>& tasks, int threads) {
    if (threads <= 1 || tasks.size() <= 1) {
        for (auto& t : tasks) t();
        return;
    }
    std::atomic<std::size_t> next{0};
    std::vector<std::exception_ptr> errors(tasks.size());
    const std::function<void()> worker = [&]() {
        for (;;) {
            const std::size_t i = next.fetch_add(1);
            if (i >= tasks.size()) return;
            try {
                tasks[i]();
            } catch (...) {
                errors[i] = std::current_exception();
            }
        }
    };
    run_team(std::min<int>(threads, static_cast<int>(tasks.size())), worker);
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

// ---------------------------------------------------------------------------------
// Union-find with the elder rule

// The forest of a pass: every vertex's parent and rank side by side, so that comparing
// the elders of two roots reads the cache lines find has just loaded (a pass took ~15%
// longer with parents and ranks in two arrays). A root is the eldest vertex of its
// component (the younger root is always linked under the elder), whatever the shape
// of the trees, so path halving changes no result.
class Forest {
  public:
    // Every vertex on its own, except that with absent != kNone the vertices of rank
    // kInfRank (cells that do not exist) start linked under it.
    Forest(std::size_t n, const rank_t* ranks, std::uint32_t absent = kNone) : node_(n) {
        for (std::size_t i = 0; i < n; ++i) node_[i] = {static_cast<std::uint32_t>(i), ranks[i]};
        if (absent != kNone)
            for (std::size_t i = 0; i < n; ++i)
                if (ranks[i] == kInfRank && i != absent) node_[i].parent = absent;
    }
    std::uint32_t find(std::uint32_t x) {
        while (node_[x].parent != x) {
            node_[x].parent = node_[node_[x].parent].parent;  // path halving
            x = node_[x].parent;
        }
        return x;
    }
    rank_t rank(std::uint32_t x) const { return node_[x].rank; }
    key_t key(std::uint32_t x) const { return make_key(node_[x].rank, x); }
    void prefetch(std::uint32_t x) const { __builtin_prefetch(&node_[x]); }
    void link(std::uint32_t younger, std::uint32_t elder) { node_[younger].parent = elder; }

  private:
    struct Node {
        std::uint32_t parent;
        rank_t rank;
    };
    big_vector<Node> node_;
};

// A vertex of another filtration carried along a forest (its elder of a component),
// with its rank there beside it: comparing two elders reads no other array.
struct Elder {
    std::uint32_t cell;
    rank_t rank;
    key_t key() const { return make_key(rank, cell); }
};

// Every vertex its own elder in the filtration of ranks v.
inline big_vector<Elder> own_elders(std::size_t n, const rank_t* v) {
    big_vector<Elder> e(n);
    for (std::size_t i = 0; i < n; ++i) e[i] = {static_cast<std::uint32_t>(i), v[i]};
    return e;
}

inline big_vector<std::uint32_t> identity_labels(std::size_t n) {
    big_vector<std::uint32_t> label(n);
    for (std::size_t i = 0; i < n; ++i) label[i] = static_cast<std::uint32_t>(i);
    return label;
}

// The ends of an edge (packed 1-cell) of the lattice.
inline void edge_ends(const Lattice& L, std::uint32_t cell, std::uint32_t& a, std::uint32_t& b) {
    a = cell / 3;
    b = static_cast<std::uint32_t>(a + L.stride[cell % 3]);
}

// index[birth vertex] = the index of the pair born there, or -1.
inline big_vector<std::int32_t> pairs_by_birth(const std::vector<CellPair>& pairs, std::size_t points) {
    big_vector<std::int32_t> index(points, -1);
    for (std::size_t i = 0; i < pairs.size(); ++i) index[pairs[i].birth_cell] = static_cast<std::int32_t>(i);
    return index;
}

// The passes reserve room for one pair per kPairsPerPoint points up front: a noisy
// prediction has about that many in each dimension (an untrained network's 256^2 crop:
// 16,000 of dimension 0 and 8,000 of dimension 1), and growing the vectors pair by pair
// cost about 1 % of a matching (interleaved A/B, 48 rounds); untouched reserved pages
// cost nothing.
constexpr std::size_t kPairsPerPoint = 4;

// The union-find passes take their edges in filtration order, so in an image of many
// values (a prediction, a comparison image) the two ends of an edge lie anywhere: from
// 512^2 on, the forest no longer fits a core's L2 cache and every find starts with a
// miss. The nodes of the edge this many places ahead are fetched early (-8 % of a noisy
// 512^2 matching; no change at 256^2). A mask's edges come in index order within each
// of its two values, already the order the hardware prefetches: `scattered` false.
constexpr std::size_t kFetchAhead = 16;

// Dimension 0: (birth vertex, death edge) pairs of positive persistence; v = vertex
// ranks. Elders by (rank, index) of the vertex. unmerged: receives the keys of the
// edges that merge nothing, in order (2D: the top dimension's edges, see top_pass).
template <class KeyAt>
void dim0_pass(const Lattice& L, std::size_t count, KeyAt key_at, const rank_t* v, std::vector<CellPair>& pairs,
               big_vector<key_t>* unmerged = nullptr, bool scattered = true) {
    Forest uf(static_cast<std::size_t>(L.points), v);
    pairs.reserve(pairs.size() + static_cast<std::size_t>(L.points) / kPairsPerPoint);
    const std::size_t ahead = scattered ? kFetchAhead : count;
    for (std::size_t i = 0; i < count; ++i) {
        if (i + ahead < count) {
            std::uint32_t fa, fb;
            edge_ends(L, key_cell(key_at(i + ahead)), fa, fb);
            uf.prefetch(fa);
            uf.prefetch(fb);
        }
        const key_t key = key_at(i);
        const std::uint32_t cell = key_cell(key);
        std::uint32_t a, b;
        edge_ends(L, cell, a, b);
        const std::uint32_t ra = uf.find(a), rb = uf.find(b);
        if (ra == rb) {
            if (unmerged) unmerged->push_back(key);
            continue;
        }
        const bool a_younger = uf.key(ra) > uf.key(rb);
        const std::uint32_t younger = a_younger ? ra : rb;
        uf.link(younger, a_younger ? rb : ra);
        if (uf.rank(younger) != key_rank(key)) pairs.push_back({younger, cell});
    }
}

// Dimension-0 image persistence into the union C: C's union-find (vc) carrying the
// elders of X0 (v0) and X1 (v1) along (their forests have the same partition as C's at
// every step). For every pair of C, the X0- and X1-younger vertices. unmerged: as in
// dim0_pass, for C.
template <class KeyAt>
std::vector<std::pair<std::uint32_t, std::uint32_t>> image_births0(const Lattice& L, std::size_t count, KeyAt key_at,
                                                                   const rank_t* vc, const rank_t* v0,
                                                                   const rank_t* v1,
                                                                   big_vector<key_t>* unmerged = nullptr) {
    const std::size_t N = static_cast<std::size_t>(L.points);
    Forest uf(N, vc);
    struct Elders {  // X0's and X1's elder of a component, by its root
        Elder x0, x1;
    };
    big_vector<Elders> lab(N);
    for (std::size_t i = 0; i < N; ++i) {
        lab[i].x0 = {static_cast<std::uint32_t>(i), v0[i]};
        lab[i].x1 = {static_cast<std::uint32_t>(i), v1[i]};
    }
    std::vector<std::pair<std::uint32_t, std::uint32_t>> out;
    out.reserve(N / kPairsPerPoint);
    for (std::size_t i = 0; i < count; ++i) {
        if (i + kFetchAhead < count) {
            std::uint32_t fa, fb;
            edge_ends(L, key_cell(key_at(i + kFetchAhead)), fa, fb);
            uf.prefetch(fa);
            uf.prefetch(fb);
            __builtin_prefetch(&lab[fa]);
            __builtin_prefetch(&lab[fb]);
        }
        const key_t key = key_at(i);
        std::uint32_t a, b;
        edge_ends(L, key_cell(key), a, b);
        const std::uint32_t ra = uf.find(a), rb = uf.find(b);
        if (ra == rb) {
            if (unmerged) unmerged->push_back(key);
            continue;
        }
        const bool a_younger = uf.key(ra) > uf.key(rb);
        const std::uint32_t younger = a_younger ? ra : rb, elder = a_younger ? rb : ra;
        uf.link(younger, elder);
        const Elders ea = lab[ra], eb = lab[rb];
        const bool x0a_younger = ea.x0.key() > eb.x0.key(), x1a_younger = ea.x1.key() > eb.x1.key();
        lab[elder] = {x0a_younger ? eb.x0 : ea.x0, x1a_younger ? eb.x1 : ea.x1};
        if (uf.rank(younger) != key_rank(key))
            out.emplace_back(x0a_younger ? ea.x0.cell : eb.x0.cell, x1a_younger ? ea.x1.cell : eb.x1.cell);
    }
    return out;
}

// Dimension 0 with the intersection H as comparison (H is contained in X): X's own
// union-find (vx) carrying H's elders (vh). For every pair of X, in order, the index of
// H's pair born at the H-younger vertex (h_pair_of_birth), or -1.
template <class KeyAt>
std::vector<std::int32_t> dim0_into(const Lattice& L, std::size_t count, KeyAt key_at, const rank_t* vx,
                                    const rank_t* vh, const std::int32_t* h_pair_of_birth) {
    const std::size_t N = static_cast<std::size_t>(L.points);
    Forest uf(N, vx);
    big_vector<std::uint32_t> lab = identity_labels(N);
    std::vector<std::int32_t> out;
    out.reserve(N / kPairsPerPoint);
    for (std::size_t i = 0; i < count; ++i) {
        const key_t key = key_at(i);
        std::uint32_t a, b;
        edge_ends(L, key_cell(key), a, b);
        const std::uint32_t ra = uf.find(a), rb = uf.find(b);
        if (ra == rb) continue;
        const bool a_younger = uf.key(ra) > uf.key(rb);
        const std::uint32_t younger = a_younger ? ra : rb, elder = a_younger ? rb : ra;
        uf.link(younger, elder);
        const std::uint32_t ha = lab[ra], hb = lab[rb];
        const bool ha_younger = make_key(vh[ha], ha) > make_key(vh[hb], hb);
        lab[elder] = ha_younger ? hb : ha;
        if (uf.rank(younger) != key_rank(key)) out.push_back(h_pair_of_birth[ha_younger ? ha : hb]);
    }
    return out;
}

// The two top cells a (d-1)-cell with normal axis u joins: those based at b - e_u and
// b (indices l - stride_u and l), or the point at infinity (index points) for l - s < 0.
// Top cells that do not exist (the last layer along some axis; for b_u = 0 the index
// l - stride_u lies in the last layer of a lower axis) are linked to infinity before a
// pass starts (Forest's absent), so no existence test and no coordinates are needed.
inline void dual_ends(const Lattice& L, std::uint32_t cell, std::uint32_t& a, std::uint32_t& b) {
    const std::uint32_t inf = static_cast<std::uint32_t>(L.points);
    const std::uint32_t l = cell / 3;
    const int t = static_cast<int>(cell % 3);
    const std::uint32_t s = static_cast<std::uint32_t>(L.stride[L.ndim == 3 ? t : 1 - t]);
    b = l;
    a = l >= s ? l - s : inf;
}

// A merge of the dual pass: the roots of the younger and the elder component, and the
// index of the pair it makes (-1 when the pair has zero persistence).
struct TopMerge {
    std::uint32_t younger, elder;
    std::int32_t pair;
};

// Image persistence of dimension d-1: another complex's (C's) elder of every component
// of X's dual forest, carried along X's merges. At a merge that makes pair i of X,
// match_top[the C-younger of the two elders] = i. ctop: C's top ranks by base point
// (kInfRank at index points, infinity). Two labels are never the same cell (they are
// elders of disjoint components), so which merging root comes first does not matter.
class TopLabels {
  public:
    TopLabels(std::size_t points, const rank_t* ctop, big_vector<std::int32_t>& match_top)
        : label_(own_elders(points + 1, ctop)), match_top_(match_top) {
        match_top_.assign(points + 1, -1);
    }
    void prefetch(std::uint32_t x) const { __builtin_prefetch(&label_[x]); }
    void operator()(const TopMerge& m) {
        const Elder c0 = label_[m.younger], c1 = label_[m.elder];
        const bool c0_younger = c0.key() < c1.key();
        label_[m.elder] = c0_younger ? c1 : c0;
        if (m.pair >= 0) match_top_[c0_younger ? c0.cell : c1.cell] = m.pair;
    }

  private:
    big_vector<Elder> label_;
    big_vector<std::int32_t>& match_top_;
};

// Dimension d-1: union-find on the dual graph (top cells plus the point at infinity,
// the eldest), the (d-1)-cells in *decreasing* order through key_at. xtop: the complex's
// top ranks by base point (kInfRank: no top cell) with kInfRank at index points
// (infinity); elders by (rank, index), so infinity is the eldest. Pairs are
// ((d-1)-cell, top cell). on_merge(TopMerge) sees every merge (TopLabels: image
// persistence; a recorded list replays the merges of a fixed complex for every other
// C, see replay_top). on_column(cell) receives every cell that merges nothing (the
// columns of the dimension-1 reduction, after clearing). fetch(top cell) is told the
// ends of the cell kFetchAhead places ahead (TopLabels::prefetch) when `scattered`.
//
// In 2D the (d-1)-cells are the edges, and the edges that merge nothing here are
// exactly those that merge in dimension 0: the complement of a minimum spanning tree of
// a plane graph is a maximum spanning tree of its dual (all keys differ). So a 2D pass
// after dimension 0 needs only the edges dimension 0 left unmerged (dim0_pass's
// unmerged), all of which merge here: half the edges, and no column to report (2D has
// no dimension-1 reduction).
struct NoFetch {
    void operator()(std::uint32_t) const {}
};

template <class KeyAt, class OnMerge, class OnColumn, class Fetch = NoFetch>
void top_pass(const Lattice& L, std::size_t count, KeyAt key_at, const rank_t* xtop, std::vector<CellPair>& pairs,
              OnMerge on_merge, OnColumn on_column, Fetch fetch = {}, bool scattered = true) {
    const std::size_t N = static_cast<std::size_t>(L.points);
    bool have_top = true;
    for (int a = 0; a < L.ndim; ++a) have_top = have_top && L.n[a] >= 2;
    if (!have_top) {
        for (std::size_t i = 0; i < count; ++i) on_column(key_cell(key_at(i)));
        return;
    }
    // the top cells and infinity (the eldest, the root of its component throughout),
    // with the missing top cells already joined to it
    Forest uf(N + 1, xtop, static_cast<std::uint32_t>(N));
    pairs.reserve(pairs.size() + N / kPairsPerPoint);
    const std::size_t ahead = scattered ? kFetchAhead : count;
    for (std::size_t i = 0; i < count; ++i) {
        if (i + ahead < count) {
            std::uint32_t f0, f1;
            dual_ends(L, key_cell(key_at(i + ahead)), f0, f1);
            uf.prefetch(f0);
            uf.prefetch(f1);
            fetch(f0);
            fetch(f1);
        }
        const key_t key = key_at(i);
        const std::uint32_t cell = key_cell(key);
        std::uint32_t p0, p1;
        dual_ends(L, cell, p0, p1);
        const std::uint32_t r0 = uf.find(p0), r1 = uf.find(p1);
        if (r0 == r1) {
            on_column(cell);
            continue;
        }
        const bool first_younger = uf.key(r0) < uf.key(r1);
        const std::uint32_t younger = first_younger ? r0 : r1, elder = first_younger ? r1 : r0;
        uf.link(younger, elder);
        std::int32_t pair = -1;
        if (uf.rank(younger) != key_rank(key)) {
            pair = static_cast<std::int32_t>(pairs.size());
            pairs.push_back({cell, younger});
        }
        on_merge(TopMerge{younger, elder, pair});
    }
}

// The image part of top_pass for a complex whose merges were recorded (a prepared
// target): the same labels and match_top as a pass with TopLabels, without the pass.
inline void replay_top(const std::vector<TopMerge>& merges, std::size_t points, const rank_t* ctop,
                       big_vector<std::int32_t>& match_top) {
    TopLabels labels(points, ctop, match_top);
    for (const TopMerge& m : merges) labels(m);
}

// ---------------------------------------------------------------------------------
// Matchings

using Matches = std::vector<std::vector<std::pair<std::int32_t, std::int32_t>>>;  // per dimension: (i in a, i in b)

// Pairs of a and b matched through the same pair of a comparison: to_c0[i] / to_c1[j] =
// the comparison pair matched with a's pair i / b's pair j (or -1); nc comparison pairs.
inline std::vector<std::pair<std::int32_t, std::int32_t>> matched_through(const std::vector<std::int32_t>& to_c0,
                                                                          const std::vector<std::int32_t>& to_c1,
                                                                          std::size_t nc) {
    std::vector<std::int32_t> b_of_c(nc, -1);
    for (std::size_t j = 0; j < to_c1.size(); ++j)
        if (to_c1[j] >= 0) b_of_c[to_c1[j]] = static_cast<std::int32_t>(j);
    std::vector<std::pair<std::int32_t, std::int32_t>> out;
    for (std::size_t i = 0; i < to_c0.size(); ++i)
        if (to_c0[i] >= 0 && b_of_c[to_c0[i]] >= 0) out.emplace_back(static_cast<std::int32_t>(i), b_of_c[to_c0[i]]);
    return out;
}

// The result of a matching of dimension-d images: for every dimension k, the matched
// pairs (row i of a with row i of b) and the unmatched ones (if opt asks for them) as
// voxel coordinates; b's only with opt.report_b, its numbers of pairs always. pairs_a(k) / pairs_b(k): the pairs of dimension k of each image;
// report_a / report_b(cells, k, out): voxels of (birth, death) packed cells of
// dimensions (k, k + 1), interleaved (2D top cells are squares with normal z).
template <class PairsOf, class Report>
MatchingResult assemble_matching(int d, PairsOf pairs_a, PairsOf pairs_b, const Matches& matches, const Options& opt,
                                 Report report_a, Report report_b) {
    MatchingResult res;
    res.ndim = d;
    res.matched_a.resize(d);
    res.matched_b.resize(d);
    res.unmatched_a.resize(d);
    res.unmatched_b.resize(d);
    res.num_unmatched_a.assign(d, 0);
    res.num_unmatched_b.assign(d, 0);
    for (int k = 0; k < d; ++k) {
        const std::vector<CellPair>& p0 = pairs_a(k);
        const std::vector<CellPair>& p1 = pairs_b(k);
        auto add = [&](std::vector<std::uint64_t>& cells, const CellPair& p) {
            cells.push_back(p.birth_cell);
            cells.push_back(k == d - 1 && d == 2 ? 3ull * p.death_cell + 2 : p.death_cell);
        };
        std::vector<char> used0(p0.size(), 0), used1(p1.size(), 0);
        std::vector<std::uint64_t> ma, mb, ua, ub;
        ma.reserve(2 * matches[k].size());
        mb.reserve(2 * matches[k].size());
        if (opt.include_unmatched_a) ua.reserve(2 * (p0.size() - matches[k].size()));
        if (opt.include_unmatched_b && opt.report_b) ub.reserve(2 * (p1.size() - matches[k].size()));
        for (const auto& [i0, i1] : matches[k]) {
            used0[i0] = used1[i1] = 1;
            add(ma, p0[i0]);
            if (opt.report_b) add(mb, p1[i1]);
        }
        res.num_unmatched_a[k] = static_cast<std::int64_t>(p0.size() - matches[k].size());
        res.num_unmatched_b[k] = static_cast<std::int64_t>(p1.size() - matches[k].size());
        if (opt.include_unmatched_a)
            for (std::size_t i = 0; i < p0.size(); ++i)
                if (!used0[i]) add(ua, p0[i]);
        if (opt.include_unmatched_b && opt.report_b)
            for (std::size_t i = 0; i < p1.size(); ++i)
                if (!used1[i]) add(ub, p1[i]);
        report_a(ma, k, res.matched_a[k]);
        report_b(mb, k, res.matched_b[k]);
        report_a(ua, k, res.unmatched_a[k]);
        report_b(ub, k, res.unmatched_b[k]);
    }
    return res;
}

// ---------------------------------------------------------------------------------
// Dimension 1 in 3D: Z/2 column reduction of squares against edges

// Long working columns: a set of row positions with Z/2 toggling and "largest element"
// queries, as a 64-ary tree of bit words (each level marks the non-zero words of the
// level below). Toggle and max cost a few word operations whatever the column's length.
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
        for (std::size_t l = levels_.size(); l-- > 0;) idx = idx * 64 + (63 - __builtin_clzll(levels_[l][idx]));
        return static_cast<std::uint32_t>(idx);
    }

  private:
    std::vector<std::vector<std::uint64_t>> levels_;
};

// The left-to-right reduction (Z/2) of square columns against edge rows, rows by their
// position in the row filtration's order (pos: edge -> position). A column is either
// taken as it stands (own_raw: its pivot, the largest position, was free when reached)
// or reduced by adding the columns that own its pivots until the pivot is free (the
// reduced column is then stored) or the column vanishes. What owns a row position is one
// word, so the pivot lookup also fetches the column to add: kFree, kRaw | square (the
// column is its boundary, recomputed), or the offset of a stored column in the arena
// (length first). Owner = std::uint32_t halves the cache footprint where the cells fit
// in 31 bits; reduce() then throws std::length_error past 2^31 stored entries (retry
// with std::uint64_t).
template <class Owner>
class ColumnReduction {
  public:
    static constexpr Owner kFree = ~Owner(0);
    static constexpr Owner kRaw = Owner(1) << (8 * sizeof(Owner) - 1);
    // Columns longer than this leave the sorted vector for the bit tree (128: about 2x
    // faster than 1024 on tie-heavy images, where long columns are common).
    static constexpr std::size_t kShortColumn = 128;

    ColumnReduction(const Lattice& L, const std::uint32_t* pos, std::size_t rows)
        : L_(L), pos_(pos), rows_(rows), owner_(rows, kFree) {}

    bool is_free(std::uint32_t p) const { return owner_[p] == kFree; }
    void own_raw(std::uint32_t p, std::uint32_t square) { owner_[p] = kRaw | square; }
    void prefetch_owner(std::uint32_t p) const { __builtin_prefetch(&owner_[p]); }

    // Row positions of the boundary of `square`, descending.
    void boundary(std::uint32_t square, std::uint32_t out[4]) const {
        std::uint32_t e[4];
        square_edges(L_, square, e);
        for (int q = 0; q < 4; ++q) out[q] = pos_[e[q]];
        auto cs = [&](int a, int b) {
            if (out[a] < out[b]) std::swap(out[a], out[b]);
        };
        cs(0, 1), cs(2, 3), cs(0, 2), cs(1, 3), cs(1, 2);
    }

    // Reduces the column of `square`, whose largest position p is owned. Returns the
    // pivot position of the reduced column (now owned by it), or kNone if it vanished.
    std::uint32_t reduce(std::uint32_t square, std::uint32_t p) {
        ++reduced;
        std::uint32_t b[4];
        boundary(square, b);
        wv_.assign(b, b + 4);
        bool in_tree = false;
        for (;;) {
            const Owner o = owner_[p];
            ++additions;
            const std::uint32_t* col;
            std::size_t n;
            std::uint32_t other[4];
            if (o & kRaw) {
                boundary(static_cast<std::uint32_t>(o & ~kRaw), other);
                col = other;
                n = 4;
            } else {
                col = arena_.data() + o + 1;
                n = arena_[o];
            }
            if (!in_tree && wv_.size() + n > kShortColumn) {
                if (!tree_) tree_ = std::make_unique<BitTree>(rows_);
                for (std::uint32_t q : wv_) tree_->toggle(q);
                in_tree = true;
            }
            if (in_tree) {
                for (std::size_t q = 0; q < n; ++q) tree_->toggle(col[q]);
                p = tree_->max();
            } else {
                merge_into(col, n);
                p = wv_.empty() ? kNone : wv_[0];
            }
            if (p == kNone) return kNone;  // zero column (the tree is empty again)
            if (owner_[p] == kFree) {
                if (arena_.size() >= kRaw) throw std::length_error("reduction too large for the engine");
                const std::size_t at = arena_.size();
                owner_[p] = static_cast<Owner>(at);
                arena_.push_back(0);
                if (in_tree) {
                    for (std::uint32_t q = tree_->max(); q != kNone; q = tree_->max()) {
                        arena_.push_back(q);
                        tree_->toggle(q);
                    }
                } else {
                    arena_.insert(arena_.end(), wv_.begin(), wv_.end());
                }
                arena_[at] = static_cast<std::uint32_t>(arena_.size() - at - 1);
                return p;
            }
        }
    }

    std::size_t stored() const { return arena_.size(); }
    std::size_t reduced = 0, additions = 0;

  private:
    // wv_ += c (both descending), equal entries cancel (Z/2).
    void merge_into(const std::uint32_t* c, std::size_t n) {
        tmp_.clear();
        std::size_t a = 0, b = 0;
        while (a < wv_.size() && b < n) {
            if (wv_[a] > c[b]) tmp_.push_back(wv_[a++]);
            else if (c[b] > wv_[a]) tmp_.push_back(c[b++]);
            else ++a, ++b;
        }
        tmp_.insert(tmp_.end(), wv_.begin() + a, wv_.end());
        tmp_.insert(tmp_.end(), c + b, c + n);
        wv_.swap(tmp_);
    }

    Lattice L_;
    const std::uint32_t* pos_;
    std::size_t rows_;
    big_vector<Owner> owner_;
    std::vector<std::uint32_t> arena_, wv_, tmp_;
    std::unique_ptr<BitTree> tree_;
};

}  // namespace host
}  // namespace medseg
