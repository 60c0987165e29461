// Results of the engine as Python objects (numpy int64 arrays that own their memory),
// shared by the nanobind modules _engine and _engine_cuda.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cells.hpp"

namespace medseg {
namespace py {

namespace nb = nanobind;
using OutArray = nb::ndarray<nb::numpy, std::int64_t>;

// Engine options from the Python arguments (names checked here; policy lives in Python).
inline Options make_options(bool superlevel, const std::string& construction, bool include_a, bool include_b,
                            int threads, bool intersection = false) {
    Options o;
    o.superlevel = superlevel;
    o.intersection = intersection;
    if (construction == "V") o.construction = Construction::V;
    else if (construction == "T") o.construction = Construction::T;
    else throw nb::value_error("construction must be 'V' or 'T'");
    o.include_unmatched_a = include_a;
    o.include_unmatched_b = include_b;
    o.threads = std::max(1, threads);
    return o;
}

template <class Vector>
inline OutArray to_array(Vector&& values, std::size_t cols) {
    using V = std::decay_t<Vector>;
    const std::size_t rows = cols ? values.size() / cols : 0;
    auto* heap = new V(std::move(values));
    if (heap->empty()) heap->reserve(1);
    nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<V*>(p); });
    std::size_t shape[2] = {rows, cols};
    return OutArray(heap->data(), 2, shape, owner);
}

inline OutArray to_vector(std::vector<std::int64_t>&& values) {
    auto* heap = new std::vector<std::int64_t>(std::move(values));
    const std::size_t n = heap->size();
    if (heap->empty()) heap->reserve(1);
    nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<std::int64_t>*>(p); });
    std::size_t shape[1] = {n};
    return OutArray(heap->data(), 1, shape, owner);
}

inline nb::dict barcode_to_python(BarcodeResult&& r) {
    nb::list births, deaths;
    for (auto& p : r.pairs) {
        births.append(to_array(std::move(p.birth), r.ndim));
        deaths.append(to_array(std::move(p.death), r.ndim));
    }
    nb::dict d;
    d["birth"] = births;
    d["death"] = deaths;
    d["essential_birth"] = to_array(std::move(r.essential_birth), r.ndim);
    return d;
}

inline nb::dict matching_to_python(MatchingResult&& r) {
    auto lists = [&](std::vector<VoxelPairs>& vps) {
        nb::list b, d;
        for (auto& p : vps) {
            b.append(to_array(std::move(p.birth), r.ndim));
            d.append(to_array(std::move(p.death), r.ndim));
        }
        return std::make_pair(b, d);
    };
    nb::dict out;
    auto [mab, mad] = lists(r.matched_a);
    auto [mbb, mbd] = lists(r.matched_b);
    auto [uab, uad] = lists(r.unmatched_a);
    auto [ubb, ubd] = lists(r.unmatched_b);
    out["matched_a_birth"] = mab;
    out["matched_a_death"] = mad;
    out["matched_b_birth"] = mbb;
    out["matched_b_death"] = mbd;
    out["unmatched_a_birth"] = uab;
    out["unmatched_a_death"] = uad;
    out["unmatched_b_birth"] = ubb;
    out["unmatched_b_death"] = ubd;
    out["num_unmatched_a"] = to_vector(std::move(r.num_unmatched_a));
    out["num_unmatched_b"] = to_vector(std::move(r.num_unmatched_b));
    return out;
}

// A batch's matchings (computed with options.flat_indices) as the loss reads them: for
// image a (and, with report_b, b) the flat indices into the batch (instance * voxels +
// the voxel's index in its image), key by key (matched birth, matched death, unmatched
// birth, unmatched death), then instance by instance, then dimension by dimension; and
// the (4, instances, ndim) numbers of pairs of each. Without report_b, b's matched numbers are a's and its unmatched ones
// the engine's counts (no coordinates were reported). One pass in C++ instead of
// 2 x 4 x instances x ndim small arrays for numpy to join.
struct BatchIndices {
    std::vector<std::int64_t> index[2], sizes[2];  // [0]: a, [1]: b
};

inline BatchIndices batch_indices(const std::vector<MatchingResult>& rs, const std::int64_t* shape, int ndim,
                                  bool report_b) {
    const std::size_t n = rs.size(), d = static_cast<std::size_t>(ndim);
    std::int64_t voxels = 1;
    for (int q = 0; q < ndim; ++q) voxels *= shape[q];
    BatchIndices out;
    for (int side = 0; side < 2; ++side) {
        const bool a = side == 0, coordinates = a || report_b;
        auto pairs = [&](const MatchingResult& r, int key, std::size_t k) -> const VoxelPairs& {
            if (key < 2) return a ? r.matched_a[k] : r.matched_b[k];
            return a ? r.unmatched_a[k] : r.unmatched_b[k];
        };
        std::vector<std::int64_t>& sizes = out.sizes[side];
        sizes.assign(4 * n * d, 0);
        std::size_t total = 0;
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t k = 0; k < d; ++k) {
                const std::size_t matched = rs[i].matched_a[k].birth.size();
                const std::size_t unmatched = coordinates ? pairs(rs[i], 2, k).birth.size()
                                                          : static_cast<std::size_t>(rs[i].num_unmatched_b[k]);
                for (int key = 0; key < 4; ++key)
                    sizes[(key * n + i) * d + k] = static_cast<std::int64_t>(key < 2 ? matched : unmatched);
                if (coordinates) total += 2 * (matched + unmatched);
            }
        std::vector<std::int64_t>& index = out.index[side];
        index.resize(total);
        std::size_t at = 0;
        for (int key = 0; coordinates && key < 4; ++key)
            for (std::size_t i = 0; i < n; ++i)
                for (std::size_t k = 0; k < d; ++k) {
                    const VoxelPairs& vp = pairs(rs[i], key, k);
                    const auto& voxel = key % 2 == 0 ? vp.birth : vp.death;
                    const std::int64_t offset = static_cast<std::int64_t>(i) * voxels;
                    for (const std::int64_t v : voxel) index[at++] = offset + v;
                }
    }
    return out;
}

// (index_a, sizes_a, index_b, sizes_b) as numpy arrays (1D; (4, instances, ndim)).
inline nb::tuple batch_indices_to_python(BatchIndices&& b, std::size_t instances, int ndim) {
    auto sizes = [&](std::vector<std::int64_t>&& v) {
        std::size_t shape[3] = {4, instances, static_cast<std::size_t>(ndim)};
        auto* heap = new std::vector<std::int64_t>(std::move(v));
        if (heap->empty()) heap->reserve(1);
        nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<std::int64_t>*>(p); });
        return OutArray(heap->data(), 3, shape, owner);
    };
    return nb::make_tuple(to_vector(std::move(b.index[0])), sizes(std::move(b.sizes[0])),
                          to_vector(std::move(b.index[1])), sizes(std::move(b.sizes[1])));
}

}  // namespace py
}  // namespace medseg
