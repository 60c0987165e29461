// C++ interface of the CUDA backend (compiled by nvcc in engine_cuda.cu; the nanobind
// module cuda_bindings.cpp is plain C++ and only sees this header).
#pragma once

#include <string>
#include <vector>

#include "../engine.hpp"

namespace medseg {
namespace cuda {

// The host passes' threads run as a parallel region of the process's OpenMP runtime
// (host_passes.hpp, run_team). init_host_threads registers its fork guard (at import);
// use_openmp_team(false) keeps them on threads of their own (medseg does so in forked
// and multiprocessing children, medseg/topology/_inputs.py).
void init_host_threads();
void use_openmp_team(bool enabled);

// Number of CUDA devices usable by this process (0 without a driver or a device).
int device_count();
std::string runtime_version();

// The barcode of one image whose values are in host memory (device_id < 0) or in the
// memory of CUDA device device_id. Same pairs as compute_barcode.
BarcodeResult barcode(const ImageView& image, int device_id, const Options& options);

// The Betti matching of a and b, as compute_matching gives it (either comparison).
// Both images in host memory (device_id < 0) or on device device_id.
MatchingResult matching(const ImageView& a, const ImageView& b, int device_id, const Options& options);

// Pairs (as[i], bs[i]) on `streams` CUDA streams (one host thread each), all on one device.
std::vector<MatchingResult> matching_batch(const std::vector<ImageView>& as, const std::vector<ImageView>& bs,
                                           int device_id, const Options& options, int streams);

}  // namespace cuda
}  // namespace medseg
