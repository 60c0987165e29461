// CUDA build of the data-parallel backend: spanning.hpp's functors launched as
// grid-stride kernels, CUB for sorting, scanning and compaction. See ../CUDA.md.
#include "engine_cuda.hpp"

#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_select.cuh>

#include <atomic>
#include <exception>
#include <limits>
#include <stdexcept>
#include <thread>
#include <string>
#include <vector>

#include "../matching_parallel.hpp"

namespace medseg {
namespace cuda {
namespace {

void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("medseg CUDA backend: ") + what + ": " + cudaGetErrorString(err));
}

template <class T>
class DeviceArray {
  public:
    DeviceArray() = default;
    // Stream-ordered allocation (cudaMallocAsync): pairs of a batch run on their own
    // streams without the device-wide synchronisation of cudaMalloc/cudaFree.
    DeviceArray(std::size_t n, cudaStream_t s) : n_(n), s_(s) {
        if (n) check(cudaMallocAsync(reinterpret_cast<void**>(&p_), n * sizeof(T), s), "cudaMallocAsync");
    }
    DeviceArray(DeviceArray&& o) noexcept : p_(o.p_), n_(o.n_), s_(o.s_) {
        o.p_ = nullptr;
        o.n_ = 0;
    }
    DeviceArray& operator=(DeviceArray&& o) noexcept {
        if (this != &o) {
            release();
            p_ = o.p_;
            n_ = o.n_;
            s_ = o.s_;
            o.p_ = nullptr;
            o.n_ = 0;
        }
        return *this;
    }
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    ~DeviceArray() { release(); }
    T* data() const { return p_; }
    std::size_t size() const { return n_; }
    void shrink(std::size_t n) { n_ = n; }  // logical size only

  private:
    void release() {
        if (p_) cudaFreeAsync(p_, s_);  // ordered after the work queued on s_
        p_ = nullptr;
    }
    T* p_ = nullptr;
    std::size_t n_ = 0;
    cudaStream_t s_ = nullptr;
};

template <class F>
__global__ void for_each_kernel(std::size_t n, F f) {
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::size_t>(blockDim.x) * gridDim.x)
        f(i);
}

struct DeviceExec {
    template <class T>
    using Array = DeviceArray<T>;

    cudaStream_t stream = nullptr;
    int sms = 1;

    template <class T>
    Array<T> array(std::size_t n) const { return Array<T>(n, stream); }

    template <class F>
    void for_each(std::size_t n, const F& f) const {
        if (n == 0) return;
        constexpr int kBlock = 256;
        const std::size_t want = (n + kBlock - 1) / kBlock;
        const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>(want, std::size_t(sms) * 32));
        for_each_kernel<<<blocks, kBlock, 0, stream>>>(n, f);
        check(cudaGetLastError(), "kernel launch");
    }

    void sort_pairs(std::uint64_t* keys, std::uint32_t* vals, std::size_t n, int lo, int hi) const {
        if (n < 2 || hi <= lo) return;
        Array<std::uint64_t> k2(n, stream);
        Array<std::uint32_t> v2(vals ? n : 0, stream);
        cub::DoubleBuffer<std::uint64_t> kb(keys, k2.data());
        cub::DoubleBuffer<std::uint32_t> vb(vals, v2.data());
        std::size_t bytes = 0;
        const int num = static_cast<int>(n);
        if (vals) check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, kb, vb, num, lo, hi, stream), "sort");
        else check(cub::DeviceRadixSort::SortKeys(nullptr, bytes, kb, num, lo, hi, stream), "sort");
        Array<unsigned char> tmp(bytes, stream);
        if (vals) check(cub::DeviceRadixSort::SortPairs(tmp.data(), bytes, kb, vb, num, lo, hi, stream), "sort");
        else check(cub::DeviceRadixSort::SortKeys(tmp.data(), bytes, kb, num, lo, hi, stream), "sort");
        if (kb.Current() != keys)
            check(cudaMemcpyAsync(keys, kb.Current(), n * sizeof(std::uint64_t), cudaMemcpyDeviceToDevice, stream),
                  "copy");
        if (vals && vb.Current() != vals)
            check(cudaMemcpyAsync(vals, vb.Current(), n * sizeof(std::uint32_t), cudaMemcpyDeviceToDevice, stream),
                  "copy");
    }
    void sort_keys(std::uint64_t* keys, std::size_t n, int lo, int hi) const {
        sort_pairs(keys, nullptr, n, lo, hi);
    }

    void inclusive_scan(const std::uint32_t* in, std::uint32_t* out, std::size_t n) const {
        std::size_t bytes = 0;
        const int num = static_cast<int>(n);
        check(cub::DeviceScan::InclusiveSum(nullptr, bytes, in, out, num, stream), "scan");
        Array<unsigned char> tmp(bytes, stream);
        check(cub::DeviceScan::InclusiveSum(tmp.data(), bytes, in, out, num, stream), "scan");
    }

    Array<std::uint64_t> select_flagged(const std::uint64_t* keys, const std::uint32_t* flags, std::size_t n) const {
        Array<std::uint64_t> out(n, stream);
        Array<int> count(1, stream);
        std::size_t bytes = 0;
        const int num = static_cast<int>(n);
        check(cub::DeviceSelect::Flagged(nullptr, bytes, keys, flags, out.data(), count.data(), num, stream), "select");
        Array<unsigned char> tmp(bytes, stream);
        check(cub::DeviceSelect::Flagged(tmp.data(), bytes, keys, flags, out.data(), count.data(), num, stream),
              "select");
        out.shrink(static_cast<std::size_t>(read(count.data())));
        return out;
    }

    template <class T>
    std::vector<T> to_host(const T* p, std::size_t n) const {
        std::vector<T> v(n);
        if (n) check(cudaMemcpyAsync(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost, stream), "copy to host");
        check(cudaStreamSynchronize(stream), "copy to host");
        return v;
    }
    template <class T>
    Array<T> from_host(const std::vector<T>& v) const {
        Array<T> a(v.size(), stream);
        if (!v.empty())
            check(cudaMemcpyAsync(a.data(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, stream),
                  "copy to device");
        check(cudaStreamSynchronize(stream), "copy to device");
        return a;
    }
    template <class T>
    T read(const T* p) const {
        T v;
        check(cudaMemcpyAsync(&v, p, sizeof(T), cudaMemcpyDeviceToHost, stream), "read");
        check(cudaStreamSynchronize(stream), "read");
        return v;
    }
    template <class T>
    void write(T* p, T v) const {
        check(cudaMemcpyAsync(p, &v, sizeof(T), cudaMemcpyHostToDevice, stream), "write");
        check(cudaStreamSynchronize(stream), "write");
    }
};

// Makes the pair's device current on this host thread and gives the caller its own back:
// the current device is per host thread and shared with PyTorch (both runtimes make the
// device's primary context current), so a cudaSetDevice left behind would move the
// caller's later torch.empty(device="cuda") / .cuda() to our device. Host inputs
// (device < 0) run on the caller's current device, as torch would put them (a torchrun
// rank's own GPU after torch.cuda.set_device), not on device 0.
class DeviceGuard {
  public:
    explicit DeviceGuard(int device) {
        check(cudaGetDevice(&prev_), "cudaGetDevice");
        dev_ = device < 0 ? prev_ : device;
        if (dev_ != prev_) check(cudaSetDevice(dev_), "cudaSetDevice");
    }
    ~DeviceGuard() {
        if (dev_ != prev_) cudaSetDevice(prev_);
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;
    int device() const { return dev_; }

  private:
    int prev_ = 0;
    int dev_ = 0;
};

class Stream {
  public:
    Stream() { check(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "stream"); }
    ~Stream() {
        cudaStreamSynchronize(s_);
        cudaStreamDestroy(s_);
    }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    cudaStream_t get() const { return s_; }

  private:
    cudaStream_t s_ = nullptr;
};

// An executor on a fresh stream of the current device.
DeviceExec make_exec(const Stream& stream) {
    DeviceExec ex;
    ex.stream = stream.get();
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&ex.sms, cudaDevAttrMultiProcessorCount, dev), "attribute");
    // Keep up to 2 GiB of freed blocks in the stream-ordered pool between calls (the
    // default, 0, hands memory back to the driver at every synchronisation).
    cudaMemPool_t pool;
    check(cudaDeviceGetDefaultMemPool(&pool, dev), "memory pool");
    std::uint64_t keep = std::uint64_t(2) << 30;
    check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "memory pool");
    return ex;
}

std::size_t image_bytes(const ImageView& im) {
    std::size_t n = 1;
    for (int a = 0; a < im.ndim; ++a) n *= static_cast<std::size_t>(im.shape[a]);
    return n * (im.dtype == DType::Float32 ? 4 : 8);
}

void check_image(const ImageView& image, bool T) {
    if (image.ndim != 2 && image.ndim != 3) throw std::invalid_argument("engine expects 2D or 3D arrays");
    std::int64_t lattice = 1;
    for (int a = 0; a < image.ndim; ++a) lattice *= image.shape[a] + (T ? 1 : 0);
    if (lattice > kMaxPoints) throw std::length_error("image too large for the engine");
    // CUB's item counts here are int: the cell arrays hold 3 x lattice slots
    if (3 * lattice > std::numeric_limits<int>::max())
        throw std::length_error("image too large for the CUDA backend: " + std::to_string(lattice) +
                                " lattice points, at most " + std::to_string(std::numeric_limits<int>::max() / 3) +
                                " (the cpu backend takes up to " + std::to_string(kMaxPoints) + ")");
}

// The image's values on the device: itself (device_id >= 0) or a copy staged on ex's stream.
par::Values device_values(const DeviceExec& ex, const ImageView& im, int device_id, DeviceArray<unsigned char>& staged) {
    const void* p = im.data;
    if (device_id < 0) {
        const std::size_t bytes = image_bytes(im);
        staged = DeviceArray<unsigned char>(bytes, ex.stream);
        check(cudaMemcpyAsync(staged.data(), im.data, bytes, cudaMemcpyHostToDevice, ex.stream), "copy");
        p = staged.data();
    }
    par::Values x;
    if (im.dtype == DType::Float32) x.f32 = static_cast<const float*>(p);
    else x.f64 = static_cast<const double*>(p);
    return x;
}

// One pair on ex's stream (the caller has ordered the inputs' producers before it).
MatchingResult match_one(const DeviceExec& ex, const ImageView& a, const ImageView& b, int device_id,
                         const Options& opt) {
    if (a.dtype != b.dtype || a.ndim != b.ndim || a.shape[0] != b.shape[0] || a.shape[1] != b.shape[1] ||
        a.shape[2] != b.shape[2])
        throw std::invalid_argument("both images must have the same shape and dtype");
    check_image(a, opt.construction == Construction::T);
    DeviceArray<unsigned char> sa, sb;
    const par::Values xa = device_values(ex, a, device_id, sa), xb = device_values(ex, b, device_id, sb);
    return par::matching_result(ex, xa, xb, a.ndim, a.shape, opt);
}

}  // namespace

void init_host_threads() { host::HostOpenMP::get(); }
void use_openmp_team(bool enabled) { host::HostOpenMP::get().set_enabled(enabled); }

int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver" error
        return 0;
    }
    return n;
}

std::string runtime_version() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

BarcodeResult barcode(const ImageView& image, int device_id, const Options& opt) {
    const bool T = opt.construction == Construction::T;
    check_image(image, T);
    const DeviceGuard guard(device_id);  // first: restored last, after the stream and buffers
    // The caller's tensor may still be written by its own stream: order after it.
    check(cudaDeviceSynchronize(), "synchronize");
    Stream stream;
    const DeviceExec ex = make_exec(stream);
    DeviceArray<unsigned char> staged;
    const par::Values x = device_values(ex, image, device_id, staged);
    return par::barcode_result(ex, x, image.ndim, image.shape, opt.superlevel, T);
}

MatchingResult matching(const ImageView& a, const ImageView& b, int device_id, const Options& opt) {
    check_image(a, opt.construction == Construction::T);  // before any CUDA call (match_one checks the pair)
    const DeviceGuard guard(device_id);
    check(cudaDeviceSynchronize(), "synchronize");
    Stream stream;
    return match_one(make_exec(stream), a, b, device_id, opt);
}

std::vector<MatchingResult> matching_batch(const std::vector<ImageView>& as, const std::vector<ImageView>& bs,
                                           int device_id, const Options& opt, int streams) {
    if (as.size() != bs.size()) throw std::invalid_argument("batches differ in length");
    const std::size_t n = as.size();
    std::vector<MatchingResult> out(n);
    if (n == 0) return out;
    const DeviceGuard guard(device_id);
    const int dev = guard.device();
    check(cudaDeviceSynchronize(), "synchronize");  // once, before any stream starts
    // A small pool of host threads, each with its own stream, takes the pairs in turn:
    // the device overlaps one pair's kernels with another's, the host passes run in
    // parallel. Every pair's buffers are stream-ordered on its thread's stream.
    const std::size_t k = std::min<std::size_t>(n, static_cast<std::size_t>(std::max(1, streams)));
    std::atomic<std::size_t> next{0};
    std::vector<std::exception_ptr> errors(n);
    Options inner = opt;
    inner.threads = 1;
    auto worker = [&]() {
        try {
            check(cudaSetDevice(dev), "cudaSetDevice");  // the current device is per host thread
            Stream stream;
            const DeviceExec ex = make_exec(stream);
            for (;;) {
                const std::size_t i = next.fetch_add(1);
                if (i >= n) return;
                try {
                    out[i] = match_one(ex, as[i], bs[i], device_id, inner);
                } catch (...) {
                    errors[i] = std::current_exception();
                }
            }
        } catch (...) {
            for (std::size_t i = next.fetch_add(n); i < n; ++i) errors[i] = std::current_exception();
        }
    };
    std::vector<std::thread> pool;
    for (std::size_t t = 1; t < k; ++t) pool.emplace_back(worker);
    worker();
    for (auto& t : pool) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
    return out;
}

}  // namespace cuda
}  // namespace medseg
