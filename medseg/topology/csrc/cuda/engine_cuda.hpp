// C++ interface of the CUDA backend (compiled by nvcc in engine_cuda.cu; the nanobind
// module cuda_bindings.cpp is plain C++ and only sees this header).
#pragma once

#include <string>

#include "../engine.hpp"

namespace medseg {
namespace cuda {

// Number of CUDA devices usable by this process (0 without a driver or a device).
int device_count();
std::string runtime_version();

// The barcode of one image whose values are in host memory (device_id < 0) or in the
// memory of CUDA device device_id. Same pairs as compute_barcode.
BarcodeResult barcode(const ImageView& image, int device_id, const Options& options);

// Dimension 0 of the union Betti matching (MatchingResult entries of dimension 0 only);
// both images in host memory (device_id < 0) or on device device_id.
MatchingResult matching_dim0(const ImageView& a, const ImageView& b, int device_id, const Options& options);

}  // namespace cuda
}  // namespace medseg
