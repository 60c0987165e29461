// Portability layer of the data-parallel backend: the algorithm in spanning.hpp is
// written once, as functors over an index range, and runs either on CPU threads
// (HostExec below, compiled into medseg.topology._engine, used by the tests on
// machines without a GPU) or on a CUDA device (DeviceExec in cuda/engine_cuda.cu).
//
// What the functors may use: MEDSEG_HD functions, plain loads and stores of slots
// that no other index of the same launch writes, and the relaxed atomics below for
// slots that several indices touch. Nothing else (no exceptions, no allocation, no
// std:: algorithms), so that the same source is valid device code.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "cells.hpp"

namespace medseg {
namespace par {

// ---------------------------------------------------------------------------------
// Atomics on shared slots. Relaxed ordering suffices everywhere: every phase of the
// algorithm ends with a launch boundary (kernel end / thread join), which orders it
// before the next phase.

MEDSEG_HD inline void atomic_min_u64(std::uint64_t* p, std::uint64_t v) {
#if defined(__CUDA_ARCH__)
    atomicMin(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
    std::uint64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < cur && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
#endif
}

MEDSEG_HD inline std::uint32_t load_u32(const std::uint32_t* p) {
#if defined(__CUDA_ARCH__)
    return *reinterpret_cast<const volatile std::uint32_t*>(p);
#else
    return __atomic_load_n(p, __ATOMIC_RELAXED);
#endif
}

MEDSEG_HD inline void store_u32(std::uint32_t* p, std::uint32_t v) {
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<volatile std::uint32_t*>(p) = v;
#else
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
#endif
}

template <class T>
MEDSEG_HD inline T max_of(T a, T b) { return a < b ? b : a; }
template <class T>
MEDSEG_HD inline T min_of(T a, T b) { return b < a ? b : a; }

// ---------------------------------------------------------------------------------
// Host execution: arrays are std::vectors, a launch is a std::thread per chunk.

struct HostExec {
    template <class T>
    using Array = std::vector<T>;

    int threads = 1;

    template <class T>
    Array<T> array(std::size_t n) const { return Array<T>(n); }

    // f(i) for i in [0, n): contiguous chunks, one per thread (small ranges inline).
    template <class F>
    void for_each(std::size_t n, const F& f) const {
        const std::size_t k = std::min<std::size_t>(static_cast<std::size_t>(std::max(1, threads)),
                                                    std::max<std::size_t>(1, n / 4096));
        if (k <= 1) {
            for (std::size_t i = 0; i < n; ++i) f(i);
            return;
        }
        std::vector<std::thread> pool;
        const std::size_t chunk = (n + k - 1) / k;
        for (std::size_t t = 1; t < k; ++t)
            pool.emplace_back([&, t] {
                const std::size_t e = std::min(n, (t + 1) * chunk);
                for (std::size_t i = t * chunk; i < e; ++i) f(i);
            });
        for (std::size_t i = 0; i < std::min(n, chunk); ++i) f(i);
        for (auto& th : pool) th.join();
    }

    // Stable LSD radix sort of 64-bit keys (bits [lo, hi)) carrying 32-bit values.
    void sort_pairs(std::uint64_t* keys, std::uint32_t* vals, std::size_t n, int lo, int hi) const {
        if (n < 2 || hi <= lo) return;
        constexpr int kBits = 11;
        constexpr std::uint64_t kMask = (1u << kBits) - 1;
        std::vector<std::uint64_t> tk(n);
        std::vector<std::uint32_t> tv(vals ? n : 0);
        std::vector<std::size_t> count(std::size_t(1) << kBits);
        std::uint64_t* a = keys;
        std::uint64_t* b = tk.data();
        std::uint32_t* av = vals;
        std::uint32_t* bv = vals ? tv.data() : nullptr;
        for (int shift = lo; shift < hi; shift += kBits) {
            std::fill(count.begin(), count.end(), 0);
            for (std::size_t i = 0; i < n; ++i) ++count[(a[i] >> shift) & kMask];
            if (count[(a[0] >> shift) & kMask] == n) continue;
            std::size_t sum = 0;
            for (auto& c : count) {
                const std::size_t t = c;
                c = sum;
                sum += t;
            }
            for (std::size_t i = 0; i < n; ++i) {
                const std::size_t to = count[(a[i] >> shift) & kMask]++;
                b[to] = a[i];
                if (av) bv[to] = av[i];
            }
            std::swap(a, b);
            std::swap(av, bv);
        }
        if (a != keys) {
            std::copy(a, a + n, keys);
            if (vals) std::copy(av, av + n, vals);
        }
    }
    void sort_keys(std::uint64_t* keys, std::size_t n, int lo, int hi) const {
        sort_pairs(keys, nullptr, n, lo, hi);
    }

    // out[i] = in[0] + ... + in[i]
    void inclusive_scan(const std::uint32_t* in, std::uint32_t* out, std::size_t n) const {
        std::uint32_t s = 0;
        for (std::size_t i = 0; i < n; ++i) out[i] = s += in[i];
    }

    // The keys whose flag is set, in order.
    std::vector<std::uint64_t> select_flagged(const std::uint64_t* keys, const std::uint32_t* flags,
                                              std::size_t n) const {
        std::vector<std::uint64_t> out;
        for (std::size_t i = 0; i < n; ++i)
            if (flags[i]) out.push_back(keys[i]);
        return out;
    }

    template <class T>
    std::vector<T> to_host(const T* p, std::size_t n) const { return std::vector<T>(p, p + n); }
    template <class T>
    Array<T> from_host(const std::vector<T>& v) const { return v; }
    template <class T>
    T read(const T* p) const { return *p; }
    template <class T>
    void write(T* p, T v) const { *p = v; }
};

}  // namespace par
}  // namespace medseg
