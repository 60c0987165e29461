// CUDA build of the data-parallel backend: spanning.hpp's functors launched as
// grid-stride kernels, CUB for sorting, scanning and compaction. See ../CUDA.md.
#include "engine_cuda.hpp"

#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_select.cuh>

#include <stdexcept>
#include <string>
#include <vector>

#include "../spanning.hpp"

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
    explicit DeviceArray(std::size_t n) : n_(n) {
        if (n) check(cudaMalloc(&p_, n * sizeof(T)), "cudaMalloc");
    }
    DeviceArray(DeviceArray&& o) noexcept : p_(o.p_), n_(o.n_) {
        o.p_ = nullptr;
        o.n_ = 0;
    }
    DeviceArray& operator=(DeviceArray&& o) noexcept {
        if (this != &o) {
            release();
            p_ = o.p_;
            n_ = o.n_;
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
        if (p_) cudaFree(p_);
        p_ = nullptr;
    }
    T* p_ = nullptr;
    std::size_t n_ = 0;
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
    Array<T> array(std::size_t n) const { return Array<T>(n); }

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
        Array<std::uint64_t> k2(n);
        Array<std::uint32_t> v2(vals ? n : 0);
        cub::DoubleBuffer<std::uint64_t> kb(keys, k2.data());
        cub::DoubleBuffer<std::uint32_t> vb(vals, v2.data());
        std::size_t bytes = 0;
        const int num = static_cast<int>(n);
        if (vals) check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, kb, vb, num, lo, hi, stream), "sort");
        else check(cub::DeviceRadixSort::SortKeys(nullptr, bytes, kb, num, lo, hi, stream), "sort");
        Array<unsigned char> tmp(bytes);
        if (vals) check(cub::DeviceRadixSort::SortPairs(tmp.data(), bytes, kb, vb, num, lo, hi, stream), "sort");
        else check(cub::DeviceRadixSort::SortKeys(tmp.data(), bytes, kb, num, lo, hi, stream), "sort");
        if (kb.Current() != keys)
            check(cudaMemcpyAsync(keys, kb.Current(), n * sizeof(std::uint64_t), cudaMemcpyDeviceToDevice, stream),
                  "copy");
        if (vals && vb.Current() != vals)
            check(cudaMemcpyAsync(vals, vb.Current(), n * sizeof(std::uint32_t), cudaMemcpyDeviceToDevice, stream),
                  "copy");
        check(cudaStreamSynchronize(stream), "sort");  // before the buffers go
    }
    void sort_keys(std::uint64_t* keys, std::size_t n, int lo, int hi) const {
        sort_pairs(keys, nullptr, n, lo, hi);
    }

    void inclusive_scan(const std::uint32_t* in, std::uint32_t* out, std::size_t n) const {
        std::size_t bytes = 0;
        const int num = static_cast<int>(n);
        check(cub::DeviceScan::InclusiveSum(nullptr, bytes, in, out, num, stream), "scan");
        Array<unsigned char> tmp(bytes);
        check(cub::DeviceScan::InclusiveSum(tmp.data(), bytes, in, out, num, stream), "scan");
        check(cudaStreamSynchronize(stream), "scan");
    }

    Array<std::uint64_t> select_flagged(const std::uint64_t* keys, const std::uint32_t* flags, std::size_t n) const {
        Array<std::uint64_t> out(n);
        Array<int> count(1);
        std::size_t bytes = 0;
        const int num = static_cast<int>(n);
        check(cub::DeviceSelect::Flagged(nullptr, bytes, keys, flags, out.data(), count.data(), num, stream), "select");
        Array<unsigned char> tmp(bytes);
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
        Array<T> a(v.size());
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

class Stream {
  public:
    Stream() { check(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "stream"); }
    ~Stream() { cudaStreamDestroy(s_); }
    cudaStream_t get() const { return s_; }

  private:
    cudaStream_t s_ = nullptr;
};

}  // namespace

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
    if (image.ndim != 2 && image.ndim != 3) throw std::invalid_argument("engine expects 2D or 3D arrays");
    const bool T = opt.construction == Construction::T;
    std::int64_t points = 1, lattice = 1;
    for (int a = 0; a < image.ndim; ++a) {
        points *= image.shape[a];
        lattice *= image.shape[a] + (T ? 1 : 0);
    }
    if (lattice > kMaxPoints) throw std::length_error("image too large for the engine");
    const std::size_t elem = image.dtype == DType::Float32 ? 4 : 8;
    const std::size_t bytes = static_cast<std::size_t>(points) * elem;
    check(cudaSetDevice(device_id < 0 ? 0 : device_id), "cudaSetDevice");
    Stream stream;
    DeviceExec ex;
    ex.stream = stream.get();
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&ex.sms, cudaDevAttrMultiProcessorCount, dev), "attribute");
    // The caller's tensor may still be written by its own stream: order after it.
    check(cudaDeviceSynchronize(), "synchronize");
    DeviceArray<unsigned char> staged;
    const void* values = image.data;
    if (device_id < 0) {
        staged = DeviceArray<unsigned char>(bytes);
        check(cudaMemcpyAsync(staged.data(), image.data, bytes, cudaMemcpyHostToDevice, ex.stream), "copy");
        values = staged.data();
    }
    par::Values x;
    if (image.dtype == DType::Float32) x.f32 = static_cast<const float*>(values);
    else x.f64 = static_cast<const double*>(values);
    BarcodeResult res;
    {
        par::ParallelBarcode<DeviceExec> pb(ex, x, image.ndim, image.shape, opt.superlevel, T);
        res = pb.barcode();
    }
    if (image.ndim == 3) {  // dimension 1 by the CPU reduction (CUDA.md: not on the device yet)
        std::vector<unsigned char> host;
        ImageView hv = image;
        if (device_id >= 0) {
            host.resize(bytes);
            check(cudaMemcpy(host.data(), image.data, bytes, cudaMemcpyDeviceToHost), "copy to host");
            hv.data = host.data();
        }
        Options o = opt;
        o.threads = 1;
        res.pairs[1] = std::move(compute_barcode(hv, o).pairs[1]);
    }
    return res;
}

MatchingResult matching_dim0(const ImageView& a, const ImageView& b, int device_id, const Options& opt) {
    if (a.dtype != b.dtype || a.ndim != b.ndim || a.shape[0] != b.shape[0] || a.shape[1] != b.shape[1] ||
        a.shape[2] != b.shape[2])
        throw std::invalid_argument("both images must have the same shape and dtype");
    std::int64_t points = 1;
    for (int q = 0; q < a.ndim; ++q) points *= a.shape[q];
    const std::size_t bytes = static_cast<std::size_t>(points) * (a.dtype == DType::Float32 ? 4 : 8);
    check(cudaSetDevice(device_id < 0 ? 0 : device_id), "cudaSetDevice");
    Stream stream;
    DeviceExec ex;
    ex.stream = stream.get();
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&ex.sms, cudaDevAttrMultiProcessorCount, dev), "attribute");
    check(cudaDeviceSynchronize(), "synchronize");
    DeviceArray<unsigned char> sa, sb;
    const void* pa = a.data;
    const void* pb = b.data;
    if (device_id < 0) {
        sa = DeviceArray<unsigned char>(bytes);
        sb = DeviceArray<unsigned char>(bytes);
        check(cudaMemcpyAsync(sa.data(), a.data, bytes, cudaMemcpyHostToDevice, ex.stream), "copy");
        check(cudaMemcpyAsync(sb.data(), b.data, bytes, cudaMemcpyHostToDevice, ex.stream), "copy");
        pa = sa.data();
        pb = sb.data();
    }
    par::Values xa, xb;
    if (a.dtype == DType::Float32) {
        xa.f32 = static_cast<const float*>(pa);
        xb.f32 = static_cast<const float*>(pb);
    } else {
        xa.f64 = static_cast<const double*>(pa);
        xb.f64 = static_cast<const double*>(pb);
    }
    return par::matching_dim0_result(ex, xa, xb, a.ndim, a.shape, opt.superlevel, opt.construction == Construction::T);
}

}  // namespace cuda
}  // namespace medseg
