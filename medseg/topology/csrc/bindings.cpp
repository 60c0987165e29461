// nanobind module medseg.topology._engine: arrays in, arrays out, GIL released.
// Validation and policy (dtypes, NaN checks, filtration names) live in Python.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <optional>
#include <exception>
#include <stdexcept>
#include <thread>

#include "engine.hpp"
#include "py_results.hpp"

namespace nb = nanobind;
using namespace medseg;
using namespace medseg::py;

namespace {

using InArray = nb::ndarray<nb::c_contig, nb::device::cpu>;

ImageView view_of(const InArray& arr) {
    ImageView v;
    if (arr.dtype() == nb::dtype<float>()) v.dtype = DType::Float32;
    else if (arr.dtype() == nb::dtype<double>()) v.dtype = DType::Float64;
    else throw nb::type_error("engine expects float32 or float64 arrays");
    if (arr.ndim() != 2 && arr.ndim() != 3) throw nb::value_error("engine expects 2D or 3D arrays");
    v.ndim = static_cast<int>(arr.ndim());
    for (int a = 0; a < v.ndim; ++a) v.shape[a] = static_cast<std::int64_t>(arr.shape(a));
    v.data = arr.data();
    return v;
}

Options make_options(bool superlevel, const std::string& construction, bool include_a, bool include_b,
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

// Runs job(i) for i in [0, n) on `threads` threads, each job single-threaded.
template <class Job>
void parallel_jobs(std::size_t n, int threads, Job job) {
    std::atomic<std::size_t> next{0};
    std::vector<std::exception_ptr> errors(n);
    auto worker = [&]() {
        for (;;) {
            const std::size_t i = next.fetch_add(1);
            if (i >= n) return;
            try {
                job(i);
            } catch (...) {
                errors[i] = std::current_exception();
            }
        }
    };
    const int k = static_cast<int>(std::min<std::size_t>(std::max(1, threads), n));
    std::vector<std::thread> pool;
    for (int i = 1; i < k; ++i) pool.emplace_back(worker);
    worker();
    for (auto& t : pool) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace

// Opaque handle of a prepared (cached) target.
struct Prepared {
    std::shared_ptr<const PreparedImage> ptr;
    std::size_t nbytes = 0;
};

NB_MODULE(_engine, m) {
    m.doc() = "medseg persistent-homology engine (C++): cubical barcodes and Betti matching";
    m.attr("max_points") = kMaxPoints;

    nb::class_<Prepared>(m, "PreparedImage", "The target-only part of a Betti matching, reusable across calls")
        .def_ro("nbytes", &Prepared::nbytes);

    m.def(
        "prepare_batch",
        [](std::vector<InArray> images, bool superlevel, const std::string& construction, int threads) {
            std::vector<ImageView> views;
            for (auto& im : images) views.push_back(view_of(im));
            const Options o = make_options(superlevel, construction, true, true, 1);
            std::vector<Prepared> out(views.size());
            {
                nb::gil_scoped_release release;
                parallel_jobs(views.size(), threads, [&](std::size_t i) {
                    out[i].ptr = prepare_image(views[i], o);
                    out[i].nbytes = prepared_bytes(*out[i].ptr);
                });
            }
            return out;
        },
        nb::arg("images"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("threads"));

    m.def(
        "barcode",
        [](InArray image, bool superlevel, const std::string& construction) {
            const ImageView v = view_of(image);
            const Options o = make_options(superlevel, construction, true, true, 1);
            BarcodeResult r;
            {
                nb::gil_scoped_release release;
                r = compute_barcode(v, o);
            }
            return barcode_to_python(std::move(r));
        },
        nb::arg("image"), nb::arg("superlevel"), nb::arg("construction"));

    m.def(
        "barcode_parallel",
        [](InArray image, bool superlevel, const std::string& construction, int threads) {
            const ImageView v = view_of(image);
            const Options o = make_options(superlevel, construction, true, true, threads);
            BarcodeResult r;
            {
                nb::gil_scoped_release release;
                r = compute_barcode_parallel(v, o);
            }
            return barcode_to_python(std::move(r));
        },
        nb::arg("image"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("threads"),
        "The CUDA backend's algorithm on CPU threads (testing; same pairs as barcode)");

    m.def(
        "matching_parallel",
        [](InArray a, InArray b, bool superlevel, const std::string& construction, bool include_a,
           bool include_b, int threads, bool intersection) {
            const ImageView va = view_of(a), vb = view_of(b);
            const Options o = make_options(superlevel, construction, include_a, include_b, threads, intersection);
            MatchingResult r;
            {
                nb::gil_scoped_release release;
                r = compute_matching_parallel(va, vb, o);
            }
            return matching_to_python(std::move(r));
        },
        nb::arg("a"), nb::arg("b"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("include_a"),
        nb::arg("include_b"), nb::arg("threads"), nb::arg("intersection") = false,
        "matching() by the CUDA backend's algorithm on CPU threads (backend='cpu-parallel'; same result)");

    m.def(
        "matching_batch_parallel",
        [](std::vector<InArray> as, std::vector<InArray> bs, bool superlevel, const std::string& construction,
           bool include_a, bool include_b, int threads, bool intersection) {
            if (as.size() != bs.size()) throw nb::value_error("batches differ in length");
            std::vector<ImageView> va, vb;
            for (auto& x : as) va.push_back(view_of(x));
            for (auto& x : bs) vb.push_back(view_of(x));
            const std::size_t n = va.size();
            // Pairs are spread over the threads; a lone pair uses them inside.
            const int inner = n == 1 ? threads : 1;
            const Options o = make_options(superlevel, construction, include_a, include_b, inner, intersection);
            std::vector<MatchingResult> rs(n);
            {
                nb::gil_scoped_release release;
                parallel_jobs(n, threads, [&](std::size_t i) { rs[i] = compute_matching_parallel(va[i], vb[i], o); });
            }
            nb::list out;
            for (auto& r : rs) out.append(matching_to_python(std::move(r)));
            return out;
        },
        nb::arg("a"), nb::arg("b"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("include_a"),
        nb::arg("include_b"), nb::arg("threads"), nb::arg("intersection") = false,
        "matching_batch() on the 'cpu-parallel' backend: pairs on threads");

    m.def(
        "barcode_batch",
        [](std::vector<InArray> images, bool superlevel, const std::string& construction, int threads) {
            std::vector<ImageView> views;
            for (auto& im : images) views.push_back(view_of(im));
            const Options o = make_options(superlevel, construction, true, true, 1);
            std::vector<BarcodeResult> rs(views.size());
            {
                nb::gil_scoped_release release;
                parallel_jobs(views.size(), threads, [&](std::size_t i) { rs[i] = compute_barcode(views[i], o); });
            }
            nb::list out;
            for (auto& r : rs) out.append(barcode_to_python(std::move(r)));
            return out;
        },
        nb::arg("images"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("threads"));

    m.def(
        "matching",
        [](InArray a, InArray b, bool superlevel, const std::string& construction, bool include_a,
           bool include_b, int threads, bool intersection) {
            const ImageView va = view_of(a), vb = view_of(b);
            const Options o = make_options(superlevel, construction, include_a, include_b, threads, intersection);
            MatchingResult r;
            {
                nb::gil_scoped_release release;
                r = compute_matching(va, vb, o);
            }
            return matching_to_python(std::move(r));
        },
        nb::arg("a"), nb::arg("b"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("include_a"),
        nb::arg("include_b"), nb::arg("threads"), nb::arg("intersection") = false);

    m.def(
        "matching_batch",
        [](std::vector<InArray> as, std::vector<InArray> bs, bool superlevel, const std::string& construction,
           bool include_a, bool include_b, int threads, std::optional<std::vector<std::optional<Prepared>>> prepared,
           bool intersection) {
            if (as.size() != bs.size()) throw nb::value_error("batches differ in length");
            if (prepared && prepared->size() != as.size()) throw nb::value_error("prepared targets differ in length");
            std::vector<ImageView> va, vb;
            for (auto& x : as) va.push_back(view_of(x));
            for (auto& x : bs) vb.push_back(view_of(x));
            const std::size_t n = va.size();
            // Pairs are spread over the threads; a lone pair uses them inside.
            const int inner = n == 1 ? threads : 1;
            const Options o = make_options(superlevel, construction, include_a, include_b, inner, intersection);
            std::vector<MatchingResult> rs(n);
            {
                nb::gil_scoped_release release;
                parallel_jobs(n, threads, [&](std::size_t i) {
                    const PreparedImage* pb = nullptr;
                    if (prepared && (*prepared)[i]) pb = (*prepared)[i]->ptr.get();
                    rs[i] = compute_matching(va[i], vb[i], o, pb);
                });
            }
            nb::list out;
            for (auto& r : rs) out.append(matching_to_python(std::move(r)));
            return out;
        },
        nb::arg("a"), nb::arg("b"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("include_a"),
        nb::arg("include_b"), nb::arg("threads"), nb::arg("prepared") = nb::none(),
        nb::arg("intersection") = false);
}
