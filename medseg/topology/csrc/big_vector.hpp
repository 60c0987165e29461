// Storage for the engine's large per-cell arrays.
//
// A 256^3 matching holds about 30 arrays of 40-250 MB (ranks of every cell of three
// complexes, sorted keys, union-find forests, the reductions' row indices), ~4 GB in
// all. Fresh memory is expensive: every first touch of a page is a fault that the
// kernel serves by zeroing it (perf: ~40% of such a matching, 2.2 million faults),
// and on virtual machines often a host-side fault as well (~2.5 s per GB on the
// development VM). So arrays of 64 KiB and more are recycled: a freed block is kept and
// handed to the next allocation of a similar size, in this call (sort buffers become
// the reductions' arrays) or the next one (an evaluation worker's next case, the next
// step of a topology loss); a recycled page costs a memset. Recycling is about a third
// of what took the 256^3 evaluation case from 8.5 s to 1.5 s (the rest: engine.cpp's
// mask path and task graph). Small images need it too: the arrays of a 256^2 matching
// (0.1-1 MB) are mapped and unmapped by malloc around its trim threshold, ~1700 page
// faults per matching, 15% of its time, before the threshold came down from 2 MiB.
//
// Like PyTorch's caching allocator, the cache keeps what it holds until
// release_cached_memory(); it holds at most min(4 GiB, a quarter of the RAM), or
// MEDSEG_TOPOLOGY_CACHE_MB megabytes (0 turns it off).
//
// Transparent huge pages were tried and left out: on VMs with free-page reporting a
// freed 2 MiB block goes back to the host at once, and the first matching of a
// process took 10.6-12 s instead of 5-6 s (same steady state).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <new>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <unistd.h>
#endif

namespace medseg {

namespace detail {

// Arrays from this size on are recycled.
constexpr std::size_t kBlockUnit = std::size_t(1) << 16;

// Blocks are rounded up to a size class (steps of 1/16 to 1/8 of the size, at least
// kBlockUnit: at most 12.5% slack), so that the slightly larger arrays of the next
// image (another shape, the T construction's extra layer) still fit cached blocks.
inline std::size_t block_size(std::size_t bytes) {
    std::size_t step = kBlockUnit;
    while (step * 16 <= bytes) step *= 2;
    return (bytes + step - 1) / step * step;
}

// MEDSEG_TOPOLOGY_CACHE_MB: a whole number of megabytes (up to 2^40); anything else
// (negative, fractional, text, too large) is ignored here and refused by name in Python
// (medseg.topology._inputs.engine).
inline bool cache_mb_from_env(std::size_t& mb) {
    const char* text = std::getenv("MEDSEG_TOPOLOGY_CACHE_MB");
    if (!text || !*text) return false;
    std::size_t value = 0;
    for (const char* c = text; *c; ++c) {
        if (*c < '0' || *c > '9' || value > (std::size_t(1) << 40) / 10) return false;
        value = value * 10 + static_cast<std::size_t>(*c - '0');
    }
    if (value > (std::size_t(1) << 40)) return false;
    mb = value;
    return true;
}

inline std::size_t cache_limit_bytes() {
    if (std::size_t mb = 0; cache_mb_from_env(mb)) return mb << 20;
    std::size_t limit = std::size_t(4) << 30;
#if defined(__linux__)
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) limit = std::min(limit, static_cast<std::size_t>(pages) * page / 4);
#endif
    return limit;
}

// Freed large blocks, process-wide. A block serves a request of at least half its size.
class BlockCache {
  public:
    static BlockCache& instance() {
        static BlockCache* cache = [] {
            auto* c = new BlockCache();  // never destroyed: usable at exit
#if defined(__linux__)
            // A fork (a DataLoader worker) while another thread holds the lock would leave
            // the child's copy locked forever: the child starts with a fresh one.
            pthread_atfork(nullptr, nullptr, [] { new (&instance().mutex_) std::mutex(); });
#endif
            return c;
        }();
        return *cache;
    }
    void* take(std::size_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        std::size_t best = blocks_.size();
        for (std::size_t i = 0; i < blocks_.size(); ++i)
            if (blocks_[i].bytes >= bytes && blocks_[i].bytes / 2 <= bytes &&
                (best == blocks_.size() || blocks_[i].bytes < blocks_[best].bytes))
                best = i;
        if (best == blocks_.size()) return nullptr;
        Block b = blocks_[best];
        blocks_[best] = blocks_.back();
        blocks_.pop_back();
        cached_ -= b.touched;
        b.touched = std::max(b.touched, bytes);
        try {
            sizes_.emplace(b.ptr, b);
        } catch (...) {
            blocks_.push_back(b);
            cached_ += b.touched;
            throw;
        }
        return b.ptr;
    }
    void* fresh(std::size_t bytes) {
        // 25% slack: the next image is often a little larger (another crop of the same
        // scan size); untouched slack pages cost no memory and no faults.
        const std::size_t rounded = block_size(bytes + bytes / 4);
        void* p = std::malloc(rounded);
        if (!p) {
            release();
            p = std::malloc(rounded);
            if (!p) throw std::bad_alloc();
        }
        std::lock_guard<std::mutex> lock(mutex_);
        try {
            sizes_.emplace(p, Block{p, rounded, bytes});
        } catch (...) {
            std::free(p);
            throw;
        }
        return p;
    }
    void give_back(void* p) {
        std::lock_guard<std::mutex> lock(mutex_);
        Block b{p, 0, 0};
        const auto it = sizes_.find(p);
        if (it != sizes_.end()) {
            b = it->second;
            sizes_.erase(it);
        }
        if (cached_ + b.touched <= limit_) {
            try {
                blocks_.push_back(b);
                cached_ += b.touched;
                return;
            } catch (const std::bad_alloc&) {
            }
        }
        std::free(p);
    }
    std::size_t cached_bytes() {
        std::lock_guard<std::mutex> lock(mutex_);
        return cached_;
    }
    // Frees every cached block (what is in use stays).
    void release() {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const Block& b : blocks_) std::free(b.ptr);
        blocks_.clear();
        cached_ = 0;
    }

  private:
    struct Block {
        void* ptr;
        std::size_t bytes;    // allocated
        std::size_t touched;  // the most any user asked for: what can be resident
    };
    std::mutex mutex_;
    std::vector<Block> blocks_;  // cached, free
    // handed out, by address (results handed to Python stay here while Python holds them)
    std::unordered_map<void*, Block> sizes_;
    std::size_t cached_ = 0;  // touched bytes of the cached blocks (the limit's measure)
    const std::size_t limit_ = cache_limit_bytes();
};

}  // namespace detail

template <class T>
struct BigAllocator {
    using value_type = T;
    BigAllocator() = default;
    template <class U>
    BigAllocator(const BigAllocator<U>&) noexcept {}

    T* allocate(std::size_t n) {
        const std::size_t bytes = n * sizeof(T);
        if (bytes < detail::kBlockUnit) return static_cast<T*>(::operator new(bytes));
        auto& cache = detail::BlockCache::instance();
        void* p = cache.take(bytes);
        return static_cast<T*>(p ? p : cache.fresh(bytes));
    }
    void deallocate(T* p, std::size_t n) noexcept {
        if (n * sizeof(T) < detail::kBlockUnit) ::operator delete(p);
        else detail::BlockCache::instance().give_back(p);
    }
    // resize(n) and big_vector(n) leave arithmetic elements uninitialised (default-
    // initialised, not zeroed): every such array of the engine is written in full before
    // it is read, and zeroing recycled blocks first was ~4% of a 256² matching (perf).
    // assign(n, value) and resize(n, value) fill as usual.
    template <class U>
    void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
        ::new (static_cast<void*>(p)) U;
    }
    template <class U, class... Args>
    void construct(U* p, Args&&... args) {
        ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
    template <class U>
    bool operator==(const BigAllocator<U>&) const noexcept { return true; }
    template <class U>
    bool operator!=(const BigAllocator<U>&) const noexcept { return false; }
};

template <class T>
using big_vector = std::vector<T, BigAllocator<T>>;

// Scratch array from the same recycled blocks, left uninitialised (a big_vector's
// zero-fill would be a wasted pass for arrays that are written before they are read).
template <class T>
class big_buffer {
  public:
    explicit big_buffer(std::size_t n) : n_(n), p_(n ? BigAllocator<T>().allocate(n) : nullptr) {}
    ~big_buffer() {
        if (p_) BigAllocator<T>().deallocate(p_, n_);
    }
    big_buffer(const big_buffer&) = delete;
    big_buffer& operator=(const big_buffer&) = delete;
    T* data() { return p_; }
    T& operator[](std::size_t i) { return p_[i]; }
    std::size_t size() const { return n_; }

  private:
    std::size_t n_;
    T* p_;
};

// Returns the engine's cached blocks to the system (see the top of this file); returns
// the bytes freed.
inline std::size_t release_cached_memory() {
    auto& cache = detail::BlockCache::instance();
    const std::size_t bytes = cache.cached_bytes();
    cache.release();
    return bytes;
}
inline std::size_t cached_memory_bytes() { return detail::BlockCache::instance().cached_bytes(); }

}  // namespace medseg
