// Host build of the data-parallel backend (spanning.hpp, matching_parallel.hpp on CPU
// threads): the same algorithm the CUDA backend runs, so that machines without a GPU
// test its logic against the sequential engine (backend="cpu-parallel").
#include "engine.hpp"
#include "matching_parallel.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace medseg {
namespace {

void check_lattice(const ImageView& image, bool T) {
    if (image.ndim != 2 && image.ndim != 3) throw std::invalid_argument("engine expects 2D or 3D arrays");
    std::int64_t lattice = 1;
    for (int a = 0; a < image.ndim; ++a) lattice *= image.shape[a] + (T ? 1 : 0);
    if (lattice > kMaxPoints)
        throw std::length_error("image too large for the engine: " + std::to_string(lattice) +
                                " lattice points, at most " + std::to_string(kMaxPoints));
}

par::Values values_of(const ImageView& im) {
    par::Values x;
    if (im.dtype == DType::Float32) x.f32 = static_cast<const float*>(im.data);
    else x.f64 = static_cast<const double*>(im.data);
    return x;
}

}  // namespace

BarcodeResult compute_barcode_parallel(const ImageView& image, const Options& opt) {
    const bool T = opt.construction == Construction::T;
    check_lattice(image, T);
    par::HostExec ex;
    ex.threads = std::max(1, opt.threads);
    return par::barcode_result(ex, values_of(image), image.ndim, image.shape, opt.superlevel, T);
}

MatchingResult compute_matching_parallel(const ImageView& a, const ImageView& b, const Options& opt) {
    if (a.dtype != b.dtype || a.ndim != b.ndim || !std::equal(a.shape, a.shape + 3, b.shape))
        throw std::invalid_argument("both images must have the same shape and dtype");
    check_lattice(a, opt.construction == Construction::T);
    par::HostExec ex;
    ex.threads = std::max(1, opt.threads);
    return par::matching_result(ex, values_of(a), values_of(b), a.ndim, a.shape, opt);
}

}  // namespace medseg
