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

}  // namespace py
}  // namespace medseg
