// Topology-preserving thinning; the algorithm and its references are in skeleton.hpp.
#include "skeleton.hpp"

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <thread>

namespace medseg {
namespace {

// --------------------------------------------------------------------------- neighbourhoods

// The 3^d neighbourhood as bitmasks over its positions k (centre excluded): which
// positions are face neighbours of the centre, which lie in N18 (3D: not a corner),
// and, per position, its neighbours under full (Chebyshev) and face (L1) adjacency.
struct Neighbourhood {
    int ndim = 0, size = 0, centre = 0;
    std::uint32_t all = 0, face = 0, n18 = 0;
    std::uint32_t adj_full[27] = {}, adj_face[27] = {};

    explicit Neighbourhood(int d) : ndim(d), size(d == 2 ? 9 : 27), centre(d == 2 ? 4 : 13) {
        int c[27][3];
        for (int k = 0; k < size; ++k) {
            if (d == 2) {
                c[k][0] = 0, c[k][1] = k / 3 - 1, c[k][2] = k % 3 - 1;
            } else {
                c[k][0] = k / 9 - 1, c[k][1] = (k / 3) % 3 - 1, c[k][2] = k % 3 - 1;
            }
        }
        for (int a = 0; a < size; ++a) {
            if (a == centre) continue;
            const int nonzero = (c[a][0] != 0) + (c[a][1] != 0) + (c[a][2] != 0);
            all |= 1u << a;
            if (nonzero == 1) face |= 1u << a;
            if (nonzero <= 2) n18 |= 1u << a;
            for (int b = 0; b < size; ++b) {
                if (b == centre || b == a) continue;
                int cheb = 0, l1 = 0;
                for (int i = 0; i < 3; ++i) {
                    const int diff = std::abs(c[a][i] - c[b][i]);
                    cheb = std::max(cheb, diff);
                    l1 += diff;
                }
                if (cheb == 1) adj_full[a] |= 1u << b;
                if (l1 == 1) adj_face[a] |= 1u << b;
            }
        }
    }

    // The component of `set` (under `adj`) that contains position `seed`.
    std::uint32_t flood(int seed, std::uint32_t set, const std::uint32_t* adj) const {
        std::uint32_t comp = 1u << seed, frontier = comp;
        while (frontier) {
            std::uint32_t next = 0;
            for (std::uint32_t f = frontier; f; f &= f - 1) next |= adj[__builtin_ctz(f)];
            next &= set & ~comp;
            comp |= next;
            frontier = next;
        }
        return comp;
    }

    // Components of `set` under `adj` that contain a position of `touching`, capped at 2.
    int components(std::uint32_t set, const std::uint32_t* adj, std::uint32_t touching) const {
        int count = 0;
        while ((set & touching) && count < 2) {
            set &= ~flood(__builtin_ctz(set & touching), set, adj);
            ++count;
        }
        return count;
    }

    // Bertrand-Malandain topological numbers (Bertrand 1994; in 2D the same with 8/4).
    // Full connectivity: T_full(x, X) in N* (all components count) and T_face(x, X^c)
    // in N18 (3D) / N8 (2D), counting components face-adjacent to x. Face
    // connectivity: the same with object and background exchanged.
    bool simple(std::uint32_t config, bool full) const {
        const std::uint32_t fg = config & all, bg = ~config & all;
        const std::uint32_t region = ndim == 3 ? n18 : all;
        if (full) return components(fg, adj_full, all) == 1 && components(bg & region, adj_face, face) == 1;
        return components(fg & region, adj_face, face) == 1 && components(bg, adj_full, all) == 1;
    }

    // Object neighbours of the centre under the chosen connectivity.
    int object_neighbours(std::uint32_t config, bool full) const {
        return __builtin_popcount(config & (full ? all : face));
    }
};

const Neighbourhood& neighbourhood(int ndim) {
    static const Neighbourhood n2(2), n3(3);
    return ndim == 2 ? n2 : n3;
}

// --------------------------------------------------------------------------- simple-point tables

// 2D: all 2^8 neighbourhoods, computed once. 3D: 2^26 neighbourhoods, 2 bits each
// (known, simple), filled on first sight. calloc leaves untouched pages unallocated, so
// the table costs only the pages of the neighbourhoods an image contains. Concurrent
// threads may compute the same entry; both store the same bits with an atomic or.
class SimpleTable {
public:
    explicit SimpleTable(bool full) : full_(full) {
        const Neighbourhood& n = neighbourhood(2);
        for (std::uint32_t idx = 0; idx < 256; ++idx) table2_[idx] = n.simple(expand2(idx), full);
    }
    ~SimpleTable() { std::free(table3_); }
    SimpleTable(const SimpleTable&) = delete;
    SimpleTable& operator=(const SimpleTable&) = delete;

    bool simple2(std::uint32_t config) const {
        return table2_[(config & 0xFu) | ((config >> 5) << 4)];
    }

    bool simple3(std::uint32_t config) {
        const std::uint32_t idx = (config & 0x1FFFu) | ((config >> 14) << 13);
        std::uint8_t* table = table3();
        std::uint8_t* slot = table + (idx >> 2);
        const int shift = static_cast<int>(idx & 3u) * 2;
        const std::uint8_t bits = static_cast<std::uint8_t>(__atomic_load_n(slot, __ATOMIC_RELAXED) >> shift);
        if (bits & 1u) return bits & 2u;
        const bool s = neighbourhood(3).simple(config, full_);
        __atomic_fetch_or(slot, static_cast<std::uint8_t>((1u | (s ? 2u : 0u)) << shift), __ATOMIC_RELAXED);
        return s;
    }

private:
    static std::uint32_t expand2(std::uint32_t idx) { return (idx & 0xFu) | ((idx >> 4) << 5); }

    std::uint8_t* table3() {
        std::call_once(once_, [this] {
            table3_ = static_cast<std::uint8_t*>(std::calloc(std::size_t(1) << 24, 1));
            if (!table3_) throw std::bad_alloc();
        });
        return table3_;
    }

    bool full_;
    bool table2_[256] = {};
    std::once_flag once_;
    std::uint8_t* table3_ = nullptr;
};

SimpleTable& simple_table(bool full) {
    static SimpleTable full_table(true), face_table(false);
    return full ? full_table : face_table;
}

// --------------------------------------------------------------------------- threads

// f(begin, end) over [0, n) in contiguous chunks, one per thread; small ranges inline.
template <class F>
void chunked(std::size_t n, int threads, std::size_t min_chunk, const F& f) {
    const std::size_t k = std::min<std::size_t>(static_cast<std::size_t>(std::max(1, threads)),
                                                std::max<std::size_t>(1, n / min_chunk));
    if (k <= 1) {
        f(std::size_t(0), n);
        return;
    }
    std::vector<std::thread> pool;
    const std::size_t chunk = (n + k - 1) / k;
    for (std::size_t t = 1; t < k; ++t)
        pool.emplace_back([&, t] { f(std::min(n, t * chunk), std::min(n, (t + 1) * chunk)); });
    f(0, std::min(n, chunk));
    for (auto& th : pool) th.join();
}

// --------------------------------------------------------------------------- thinning

// Below these sizes a sub-iteration's phase runs on one thread: starting threads costs
// more than the work (a 1024^2 image has ~40 sub-iterations of a few thousand points).
constexpr std::size_t kMinPointsPerThread = 16384;
constexpr std::size_t kMinVoxelsPerThread = std::size_t(1) << 20;

constexpr std::uint8_t kObject = 1;  // voxel is foreground
constexpr std::uint8_t kListed = 2;  // voxel is (or was) on the border list

class Thinning {
public:
    Thinning(const std::uint8_t* mask, int ndim, const std::int64_t* shape, bool full, int threads)
        : ndim_(ndim), full_(full), threads_(std::max(1, threads)), nb_(neighbourhood(ndim)), table_(simple_table(full)) {
        for (int a = 0; a < 3; ++a) n_[a] = 1;
        for (int a = 0; a < ndim; ++a) n_[3 - ndim + a] = shape[a];
        // Padded by one background voxel on every side (2D: a single plane, no padding in z).
        p_[0] = ndim == 3 ? n_[0] + 2 : 1;
        p_[1] = n_[1] + 2;
        p_[2] = n_[2] + 2;
        stride_[2] = 1;
        stride_[1] = p_[2];
        stride_[0] = p_[1] * p_[2];
        buf_.assign(static_cast<std::size_t>(p_[0] * stride_[0]), 0);
        for (int k = 0; k < nb_.size; ++k) {
            std::int64_t dz = 0, dy, dx;
            if (ndim == 2) {
                dy = k / 3 - 1, dx = k % 3 - 1;
            } else {
                dz = k / 9 - 1, dy = (k / 3) % 3 - 1, dx = k % 3 - 1;
            }
            offset_[k] = dz * stride_[0] + dy * stride_[1] + dx;
        }
        const std::int64_t z0 = ndim == 3 ? 1 : 0;
        for (std::int64_t z = 0; z < n_[0]; ++z)
            for (std::int64_t y = 0; y < n_[1]; ++y) {
                const std::uint8_t* row = mask + (z * n_[1] + y) * n_[2];
                std::uint8_t* out = &buf_[static_cast<std::size_t>((z + z0) * stride_[0] + (y + 1) * stride_[1] + 1)];
                for (std::int64_t x = 0; x < n_[2]; ++x) out[x] = row[x] ? kObject : 0;
            }
        // Directions of the sub-iterations: the neighbour on that side must be background.
        if (ndim == 3) directions_ = {-stride_[0], stride_[0], -stride_[1], stride_[1], -1, 1};
        else directions_ = {-stride_[1], stride_[1], -1, 1};
        // The line index whose parity orders the deletions: planes in 3D, rows in 2D.
        line_stride_ = ndim == 3 ? stride_[0] : stride_[1];
    }

    void run() {
        initial_border();
        for (;;) {
            bool changed = false;
            for (std::int64_t d : directions_) changed |= sub_iteration(d) > 0;
            if (!changed && sub_iteration(0) == 0) break;
        }
    }

    void write(std::uint8_t* out) const {
        const std::int64_t z0 = ndim_ == 3 ? 1 : 0;
        for (std::int64_t z = 0; z < n_[0]; ++z)
            for (std::int64_t y = 0; y < n_[1]; ++y) {
                const std::uint8_t* in = &buf_[static_cast<std::size_t>((z + z0) * stride_[0] + (y + 1) * stride_[1] + 1)];
                std::uint8_t* row = out + (z * n_[1] + y) * n_[2];
                for (std::int64_t x = 0; x < n_[2]; ++x) row[x] = in[x] & kObject;
            }
    }

private:
    std::uint32_t config(std::int64_t p) const {
        const std::uint8_t* c = buf_.data() + p;
        std::uint32_t cfg = 0;
        for (int k = 0; k < nb_.size; ++k) cfg |= std::uint32_t(c[offset_[k]] & kObject) << k;
        return cfg & nb_.all;
    }

    bool simple(std::uint32_t cfg) const { return ndim_ == 2 ? table_.simple2(cfg) : table_.simple3(cfg); }

    // Object voxels with a background voxel in their 3^d neighbourhood: the only ones
    // that can be simple.
    void initial_border() {
        const std::size_t lines = buf_.size() / static_cast<std::size_t>(line_stride_);
        std::vector<std::vector<std::int64_t>> found(lines);
        const int threads = buf_.size() >= kMinVoxelsPerThread ? threads_ : 1;
        chunked(lines, threads, 1, [&](std::size_t b, std::size_t e) {
            for (std::size_t z = b; z < e; ++z) {
                const std::int64_t begin = static_cast<std::int64_t>(z) * line_stride_;
                for (std::int64_t p = begin; p < begin + line_stride_; ++p)
                    if ((buf_[p] & kObject) && config(p) != nb_.all) found[z].push_back(p);
            }
        });
        for (auto& f : found)
            for (std::int64_t p : f) {
                buf_[p] |= kListed;
                border_.push_back(p);
            }
    }

    // One sub-iteration; `direction` 0 accepts any simple point. Returns the deletions.
    std::size_t sub_iteration(std::int64_t direction) {
        const std::size_t n = border_.size();
        // 0 keep, 1 candidate, 2 leave the list for good (an end or isolated point stays
        // one: its only neighbour is never simple, and neighbours are never added).
        std::vector<std::uint8_t> state(n, 0);
        chunked(n, threads_, kMinPointsPerThread, [&](std::size_t b, std::size_t e) {
            for (std::size_t i = b; i < e; ++i) {
                const std::int64_t p = border_[i];
                if (direction != 0 && (buf_[p + direction] & kObject)) continue;
                const std::uint32_t cfg = config(p);
                if (nb_.object_neighbours(cfg, full_) <= 1) state[i] = 2;
                else if (simple(cfg)) state[i] = 1;
            }
        });
        std::vector<std::int64_t> candidates;
        for (std::size_t i = 0; i < n; ++i)
            if (state[i] == 1) candidates.push_back(border_[i]);
        std::sort(candidates.begin(), candidates.end());
        const std::size_t deleted = delete_in_order(candidates);
        // The list keeps its voxels still in the object and gains the object voxels next
        // to a deletion, in the deletions' order.
        std::vector<std::int64_t> next;
        next.reserve(n);
        for (std::size_t i = 0; i < n; ++i)
            if (state[i] != 2 && (buf_[border_[i]] & kObject)) next.push_back(border_[i]);
        for (std::int64_t p : candidates) {
            if (buf_[p] & kObject) continue;  // kept after the re-check
            for (int k = 0; k < nb_.size; ++k) {
                const std::int64_t q = p + offset_[k];
                if ((buf_[q] & (kObject | kListed)) == kObject) {
                    buf_[q] |= kListed;
                    next.push_back(q);
                }
            }
        }
        border_.swap(next);
        return deleted;
    }

    // Re-checks and deletes the (sorted) candidates one at a time: lines of even index
    // first, then odd, each line in raster order; lines of one parity on parallel threads.
    std::size_t delete_in_order(const std::vector<std::int64_t>& candidates) {
        std::vector<std::size_t> starts;  // candidate ranges [starts[j], starts[j+1]) of one line
        for (std::size_t i = 0; i < candidates.size(); ++i)
            if (i == 0 || candidates[i] / line_stride_ != candidates[i - 1] / line_stride_) starts.push_back(i);
        starts.push_back(candidates.size());
        std::size_t total = 0;
        for (int parity = 0; parity < 2; ++parity) {
            std::vector<std::size_t> lines;
            for (std::size_t j = 0; j + 1 < starts.size(); ++j)
                if ((candidates[starts[j]] / line_stride_) % 2 == parity) lines.push_back(j);
            std::vector<std::size_t> counts(lines.size(), 0);
            const int threads = candidates.size() >= kMinPointsPerThread ? threads_ : 1;
            chunked(lines.size(), threads, 1, [&](std::size_t b, std::size_t e) {
                for (std::size_t l = b; l < e; ++l) {
                    const std::size_t j = lines[l];
                    for (std::size_t i = starts[j]; i < starts[j + 1]; ++i) {
                        const std::int64_t p = candidates[i];
                        const std::uint32_t cfg = config(p);
                        if (nb_.object_neighbours(cfg, full_) > 1 && simple(cfg)) {
                            buf_[p] &= static_cast<std::uint8_t>(~kObject);
                            ++counts[l];
                        }
                    }
                }
            });
            for (std::size_t c : counts) total += c;
        }
        return total;
    }

    int ndim_;
    bool full_;
    int threads_;
    const Neighbourhood& nb_;
    SimpleTable& table_;
    std::int64_t n_[3], p_[3], stride_[3], offset_[27] = {}, line_stride_ = 1;
    std::vector<std::int64_t> directions_;
    std::vector<std::uint8_t> buf_;
    std::vector<std::int64_t> border_;
};

}  // namespace

std::vector<std::uint8_t> skeletonize_mask(const std::uint8_t* mask, int ndim, const std::int64_t* shape,
                                           bool full_connectivity, int threads) {
    std::int64_t count = 1;
    for (int a = 0; a < ndim; ++a) count *= shape[a];
    std::vector<std::uint8_t> out(static_cast<std::size_t>(count), 0);
    if (count == 0) return out;
    Thinning thinning(mask, ndim, shape, full_connectivity, threads);
    thinning.run();
    thinning.write(out.data());
    return out;
}

bool is_simple_point(std::uint32_t config, int ndim, bool full_connectivity) {
    const Neighbourhood& n = neighbourhood(ndim);
    return n.simple(config & n.all, full_connectivity);
}

}  // namespace medseg
