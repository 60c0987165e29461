// Host build of the data-parallel backend (spanning.hpp on CPU threads): the same
// algorithm the CUDA backend runs, so that machines without a GPU test its logic
// against the sequential engine (backend="cpu-parallel").
#include "engine.hpp"
#include "spanning.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace medseg {

BarcodeResult compute_barcode_parallel(const ImageView& image, const Options& opt) {
    if (image.ndim != 2 && image.ndim != 3) throw std::invalid_argument("engine expects 2D or 3D arrays");
    std::int64_t points = 1;
    for (int a = 0; a < image.ndim; ++a) points *= image.shape[a];
    const bool T = opt.construction == Construction::T;
    std::int64_t lattice = 1;
    for (int a = 0; a < image.ndim; ++a) lattice *= image.shape[a] + (T ? 1 : 0);
    if (lattice > kMaxPoints)
        throw std::length_error("image too large for the engine: " + std::to_string(lattice) +
                                " lattice points, at most " + std::to_string(kMaxPoints));
    par::HostExec ex;
    ex.threads = std::max(1, opt.threads);
    par::Values x;
    if (image.dtype == DType::Float32) x.f32 = static_cast<const float*>(image.data);
    else x.f64 = static_cast<const double*>(image.data);
    par::ParallelBarcode<par::HostExec> pb(ex, x, image.ndim, image.shape, opt.superlevel, T);
    BarcodeResult res = pb.barcode();
    if (image.ndim == 3) {  // dimension 1: the sequential reduction (see CUDA.md)
        Options o = opt;
        o.threads = 1;
        res.pairs[1] = std::move(compute_barcode(image, o).pairs[1]);
    }
    return res;
}

MatchingResult compute_matching_dim0_parallel(const ImageView& a, const ImageView& b, const Options& opt) {
    if (a.dtype != b.dtype || a.ndim != b.ndim || !std::equal(a.shape, a.shape + 3, b.shape))
        throw std::invalid_argument("both images must have the same shape and dtype");
    par::HostExec ex;
    ex.threads = std::max(1, opt.threads);
    auto values = [](const ImageView& im) {
        par::Values x;
        if (im.dtype == DType::Float32) x.f32 = static_cast<const float*>(im.data);
        else x.f64 = static_cast<const double*>(im.data);
        return x;
    };
    return par::matching_dim0_result(ex, values(a), values(b), a.ndim, a.shape, opt.superlevel,
                                     opt.construction == Construction::T);
}

}  // namespace medseg
