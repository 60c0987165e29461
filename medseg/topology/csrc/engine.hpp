// Public C++ entry points of the engine (CPU backend). See cells.hpp for the cell
// encoding, the filtration order and the result types.
#pragma once

#include <memory>
#include <vector>

#include "cells.hpp"

namespace medseg {

enum class DType { Float32, Float64 };

// A C-contiguous 2D or 3D image owned by the caller.
struct ImageView {
    const void* data = nullptr;
    DType dtype = DType::Float64;
    int ndim = 0;
    std::int64_t shape[3] = {1, 1, 1};
};

// Cubical persistence of one image: every finite pair in every dimension, as voxel
// coordinates, plus the essential class of dimension 0 (a box is contractible, so it
// is the only one).
BarcodeResult compute_barcode(const ImageView& image, const Options& options);

// The part of a matching that depends on one image only (its filtration, sorted
// cells and barcode), computed once and reused when the same target recurs.
struct PreparedImage;
std::shared_ptr<const PreparedImage> prepare_image(const ImageView& image, const Options& options);
std::size_t prepared_bytes(const PreparedImage& prepared);

// Betti matching between a and b (Stucki et al. 2023): the comparison image is the
// elementwise union (min for sublevel, max for superlevel), image persistence of both
// inclusions into it, and the induced matchings composed through it. Each image is
// ranked on its own (only orders within one filtration are ever compared). If
// prepared_b is given (prepare_image(b) with the same options) b's own work is reused.
MatchingResult compute_matching(const ImageView& a, const ImageView& b, const Options& options,
                                const PreparedImage* prepared_b = nullptr);

// compute_matching of every pair (as[i], bs[i]) on `threads` threads (options.threads
// is ignored), prepared[i] where `prepared` is not empty. With the union comparison the
// pairs' tasks share one task graph: a thread that one pair leaves idle takes another
// pair's ready tasks (a batch of fewer pairs than threads, the last pairs of a batch),
// with at most `threads` pairs under way at once.
std::vector<MatchingResult> compute_matchings(const std::vector<ImageView>& as, const std::vector<ImageView>& bs,
                                              const std::vector<const PreparedImage*>& prepared,
                                              const Options& options, int threads);

// The data-parallel backend's algorithm (spanning.hpp, matching_parallel.hpp) on
// options.threads CPU threads: the same pairs as compute_barcode. Dimensions 0 and d-1
// by spanning forests; 3D dimension 1 by apparent pairs screened in parallel and the
// remaining columns reduced on the host.
BarcodeResult compute_barcode_parallel(const ImageView& image, const Options& options);

// compute_matching by the data-parallel backend's algorithm (matching_parallel.hpp) on
// options.threads CPU threads: the same result, bit for bit, for both comparisons.
MatchingResult compute_matching_parallel(const ImageView& a, const ImageView& b, const Options& options);

}  // namespace medseg
