// nanobind module medseg.topology._engine: arrays in, arrays out, GIL released.
// Validation and policy (dtypes, NaN checks, filtration names) live in Python.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>

#include "big_vector.hpp"
#include "engine.hpp"
#include "host_passes.hpp"
#include "loss_terms.hpp"
#include "py_results.hpp"
#include "skeleton.hpp"

namespace nb = nanobind;
using namespace medseg;
using namespace medseg::py;

// Opaque handle of a prepared (cached) target.
struct Prepared {
    std::shared_ptr<const PreparedImage> ptr;
    std::size_t nbytes = 0;
};

namespace {

// Inputs are only read: read-only arrays (np.load(mmap_mode='r'), setflags(write=False))
// are taken as they are. OutArray: arrays the engine writes (the loss's coef and grad).
using InArray = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;
using OutArray = nb::ndarray<nb::c_contig, nb::device::cpu>;

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

// Runs job(i) for i in [0, n) on `threads` threads, one job per thread at a time.
template <class Job>
void parallel_jobs(std::size_t n, int threads, Job job) {
    std::vector<std::function<void()>> tasks;
    for (std::size_t i = 0; i < n; ++i) tasks.push_back([&job, i] { job(i); });
    host::run_tasks(tasks, threads);
}

// One pair with the GIL released: compute(a, b, options) -> MatchingResult.
template <class Compute>
nb::dict matching_of(const InArray& a, const InArray& b, bool superlevel, const std::string& construction,
                     bool include_a, bool include_b, int threads, bool intersection, Compute compute) {
    const ImageView va = view_of(a), vb = view_of(b);
    const Options o = make_options(superlevel, construction, include_a, include_b, threads, intersection);
    MatchingResult r;
    {
        nb::gil_scoped_release release;
        r = compute(va, vb, o);
    }
    return matching_to_python(std::move(r));
}

// The pairs of a batch, spread over `threads` threads; pairs fewer than the threads
// share them out and run their task graphs on their share (a lone pair uses them all,
// two pairs on 8 threads 4 each): compute(i, a, b, options) -> MatchingResult, with
// the GIL released.
template <class Compute>
std::vector<MatchingResult> matching_results(const std::vector<InArray>& as, const std::vector<InArray>& bs,
                                             const Options& base, int threads, Compute compute) {
    if (as.size() != bs.size()) throw nb::value_error("batches differ in length");
    std::vector<ImageView> va, vb;
    for (auto& x : as) va.push_back(view_of(x));
    for (auto& x : bs) vb.push_back(view_of(x));
    const std::size_t n = va.size();
    std::vector<Options> per_pair(n, base);
    for (std::size_t i = 0; i < n; ++i) per_pair[i].threads = host::threads_of_job(i, n, threads);
    std::vector<MatchingResult> rs(n);
    nb::gil_scoped_release release;
    parallel_jobs(n, threads, [&](std::size_t i) { rs[i] = compute(i, va[i], vb[i], per_pair[i]); });
    return rs;
}

// A batch's matchings as Python dicts; results(options) -> std::vector<MatchingResult>.
template <class Results>
nb::list matching_batch_of(bool superlevel, const std::string& construction, bool include_a, bool include_b,
                           bool intersection, Results results) {
    const Options o = make_options(superlevel, construction, include_a, include_b, 1, intersection);
    std::vector<MatchingResult> rs = results(o);
    nb::list out;
    for (auto& r : rs) out.append(matching_to_python(std::move(r)));
    return out;
}

using PreparedList = std::optional<std::vector<std::optional<Prepared>>>;

// The CPU engine's matchings of a batch (compute_matchings: with the union comparison
// one task graph over all pairs), with the GIL released; the prepared target of pair i
// where there is one.
std::vector<MatchingResult> engine_matchings(const std::vector<InArray>& as, const std::vector<InArray>& bs,
                                             const Options& base, int threads, const PreparedList& prepared) {
    if (as.size() != bs.size()) throw nb::value_error("batches differ in length");
    if (prepared && prepared->size() != as.size()) throw nb::value_error("prepared targets differ in length");
    std::vector<ImageView> va, vb;
    for (auto& x : as) va.push_back(view_of(x));
    for (auto& x : bs) vb.push_back(view_of(x));
    std::vector<const PreparedImage*> pb;
    if (prepared)
        for (auto& p : *prepared) pb.push_back(p ? p->ptr.get() : nullptr);
    nb::gil_scoped_release release;
    return compute_matchings(va, vb, pb, base, threads);
}

// The Betti matching loss's form of a batch (py::batch_indices): every unmatched pair,
// flat indices into the batch; b's coordinates only with report_b.
nb::tuple matching_batch_indices(const std::vector<InArray>& as, const std::vector<InArray>& bs, bool superlevel,
                                 const std::string& construction, int threads,
                                 const PreparedList& prepared, bool intersection, bool report_b) {
    if (as.empty()) throw nb::value_error("empty batch");
    if (prepared && prepared->size() != as.size()) throw nb::value_error("prepared targets differ in length");
    const ImageView first = view_of(as[0]);
    for (auto& x : as) {
        const ImageView v = view_of(x);
        if (v.ndim != first.ndim || !std::equal(v.shape, v.shape + 3, first.shape))
            throw nb::value_error("the images of a batch must share one shape");
    }
    Options o = make_options(superlevel, construction, true, true, 1, intersection);
    o.report_b = report_b;
    o.flat_indices = true;
    std::vector<MatchingResult> rs = engine_matchings(as, bs, o, threads, prepared);
    BatchIndices b;
    {
        nb::gil_scoped_release release;
        b = batch_indices(rs, first.shape, first.ndim, report_b);
        std::vector<MatchingResult>().swap(rs);
    }
    return batch_indices_to_python(std::move(b), as.size(), first.ndim);
}

// ---------------------------------------------------------------------------------
// The Betti matching loss's terms (loss_terms.hpp). Outputs are arrays the caller
// allocates: per_instance (float64, n, zeros), counted (int64, n, zeros), coef (the
// values' dtype, one per index), grad (the values' dtype, one zeroed array per instance).

using IndexArray = nb::ndarray<const std::int64_t, nb::c_contig, nb::device::cpu>;

// The instances' arrays of one dtype and size; returns voxels per instance.
template <class Array>
std::int64_t same_images(const std::vector<Array>& images, const nb::dlpack::dtype& dtype, const char* what) {
    std::int64_t voxels = -1;
    for (auto& x : images) {
        if (x.dtype() != dtype) throw nb::type_error((std::string(what) + ": every array must have the values' dtype").c_str());
        const std::int64_t s = static_cast<std::int64_t>(x.size());
        if (voxels >= 0 && s != voxels) throw nb::value_error((std::string(what) + ": instances differ in size").c_str());
        voxels = s;
    }
    return voxels;
}

// loss::index_entries of a (4, n, ndim) sizes array
std::int64_t index_entries(const IndexArray& sizes) {
    return loss::index_entries(sizes.data(), static_cast<std::int64_t>(sizes.shape(1)),
                               static_cast<int>(sizes.shape(2)));
}

void check_sizes(const IndexArray& sizes, std::size_t n, const char* what) {
    if (sizes.ndim() != 3 || sizes.shape(0) != 4 || sizes.shape(1) != n)
        throw nb::value_error((std::string(what) + " must have shape (4, instances, ndim)").c_str());
}

// Splits the instances into up to `threads` contiguous ranges of about equal numbers of
// entries (sizes: (4, n, ndim)) and runs job(first, last) for each on its own thread.
template <class Job>
void over_instances(const IndexArray& sizes, int threads, Job job) {
    const std::int64_t n = static_cast<std::int64_t>(sizes.shape(1)), ndim = static_cast<std::int64_t>(sizes.shape(2));
    std::vector<std::int64_t> entries(n, 0);
    std::int64_t total = 0;
    for (int q = 0; q < 4; ++q)
        for (std::int64_t i = 0; i < n; ++i)
            for (std::int64_t k = 0; k < ndim; ++k) entries[i] += sizes.data()[(q * n + i) * ndim + k];
    for (auto e : entries) total += e;
    const int parts = static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(threads, n)));
    std::vector<std::function<void()>> tasks;
    std::int64_t first = 0, seen = 0;
    for (int p = 0; p < parts && first < n; ++p) {
        std::int64_t last = first;
        const std::int64_t goal = total * (p + 1) / parts;
        while (last < n && (last == first || seen + entries[last] <= goal || p == parts - 1)) seen += entries[last++];
        tasks.push_back([first, last, &job] { job(first, last); });
        first = last;
    }
    host::run_tasks(tasks, parts);
}

template <class T>
void loss_terms_typed(const std::vector<InArray>& values, const std::vector<InArray>& values_t,
                      const IndexArray& index_p, const IndexArray& sizes_p, const std::optional<IndexArray>& index_t,
                      const IndexArray& sizes_t, const loss::TermOptions& o, double* per_instance,
                      std::int64_t* counted, T* coef, int threads) {
    const std::size_t n = values.size();
    const std::int64_t voxels = static_cast<std::int64_t>(values[0].size());
    std::vector<const T*> v, vt;
    for (auto& x : values) v.push_back(static_cast<const T*>(x.data()));
    for (auto& x : values_t) vt.push_back(static_cast<const T*>(x.data()));
    nb::gil_scoped_release release;
    over_instances(sizes_p, threads, [&](std::int64_t first, std::int64_t last) {
        loss::betti_terms<T>(v, voxels, static_cast<std::int64_t>(n), static_cast<int>(sizes_p.shape(2)),
                             index_p.data(), sizes_p.data(), vt, index_t ? index_t->data() : nullptr, sizes_t.data(),
                             o, per_instance, counted, coef, first, last);
    });
}

void betti_loss_terms(const std::vector<InArray>& values, const std::vector<InArray>& values_t,
                      const IndexArray& index_p, const IndexArray& sizes_p, const std::optional<IndexArray>& index_t,
                      const IndexArray& sizes_t, bool superlevel, double matched_weight, double unmatched_weight,
                      bool push_unmatched, double threshold,
                      const std::optional<nb::ndarray<const double, nb::c_contig, nb::device::cpu>>& dimension_weights,
                      nb::ndarray<double, nb::c_contig, nb::device::cpu> per_instance,
                      nb::ndarray<std::int64_t, nb::c_contig, nb::device::cpu> counted, OutArray coef, int threads) {
    const std::size_t n = values.size();
    if (n == 0) throw nb::value_error("betti_loss_terms: empty batch");
    const nb::dlpack::dtype dtype = values[0].dtype();
    if (dtype != nb::dtype<float>() && dtype != nb::dtype<double>())
        throw nb::type_error("betti_loss_terms: values must be float32 or float64");
    same_images(values, dtype, "betti_loss_terms values");
    const bool binary = values_t.empty();
    if (!binary) {
        if (values_t.size() != n) throw nb::value_error("betti_loss_terms: values_t has another number of instances");
        if (same_images(values_t, dtype, "betti_loss_terms values_t") != static_cast<std::int64_t>(values[0].size()))
            throw nb::value_error("betti_loss_terms: values_t's instances differ in size from values'");
        if (!index_t) throw nb::value_error("betti_loss_terms: values_t needs index_t");
    }
    check_sizes(sizes_p, n, "sizes_p");
    check_sizes(sizes_t, n, "sizes_t");
    if (sizes_t.shape(2) != sizes_p.shape(2)) throw nb::value_error("sizes_p and sizes_t differ in ndim");
    const std::int64_t entries = index_entries(sizes_p);
    if (index_p.ndim() != 1 || static_cast<std::int64_t>(index_p.shape(0)) != entries)
        throw nb::value_error("betti_loss_terms: index_p does not match sizes_p");
    if (!binary && (index_t->ndim() != 1 || static_cast<std::int64_t>(index_t->shape(0)) != index_entries(sizes_t)))
        throw nb::value_error("betti_loss_terms: index_t does not match sizes_t");
    if (dimension_weights && dimension_weights->size() != sizes_p.shape(2))
        throw nb::value_error("betti_loss_terms: one dimension weight per dimension");
    if (per_instance.size() != n || counted.size() != n)
        throw nb::value_error("betti_loss_terms: per_instance and counted need one entry per instance");
    if (coef.dtype() != dtype || static_cast<std::int64_t>(coef.size()) != entries)
        throw nb::value_error("betti_loss_terms: coef needs one entry of the values' dtype per index");
    loss::TermOptions o;
    o.superlevel = superlevel;
    o.matched_weight = matched_weight;
    o.unmatched_weight = unmatched_weight;
    o.push_unmatched = push_unmatched;
    o.threshold = threshold;
    o.dimension_weights = dimension_weights ? dimension_weights->data() : nullptr;
    if (dtype == nb::dtype<float>())
        loss_terms_typed<float>(values, values_t, index_p, sizes_p, index_t, sizes_t, o, per_instance.data(),
                                counted.data(), static_cast<float*>(coef.data()), threads);
    else
        loss_terms_typed<double>(values, values_t, index_p, sizes_p, index_t, sizes_t, o, per_instance.data(),
                                 counted.data(), static_cast<double*>(coef.data()), threads);
}

void betti_loss_grad(const InArray& coef, const IndexArray& index_p, const IndexArray& sizes_p,
                     nb::ndarray<const double, nb::c_contig, nb::device::cpu> upstream,
                     const std::vector<OutArray>& grad, int threads) {
    const std::size_t n = upstream.size();
    check_sizes(sizes_p, n, "sizes_p");
    if (grad.size() != n) throw nb::value_error("betti_loss_grad: one grad array per instance");
    if (index_p.ndim() != 1 || coef.size() != index_p.size() ||
        static_cast<std::int64_t>(index_p.size()) != index_entries(sizes_p))
        throw nb::value_error("betti_loss_grad: index_p, coef and sizes_p do not match");
    const std::int64_t voxels = same_images(grad, coef.dtype(), "betti_loss_grad grad");
    const int ndim = static_cast<int>(sizes_p.shape(2));
    auto run = [&](auto zero) {
        using T = decltype(zero);
        std::vector<T*> out;
        for (auto& g : grad) out.push_back(static_cast<T*>(g.data()));
        nb::gil_scoped_release release;
        over_instances(sizes_p, threads, [&](std::int64_t first, std::int64_t last) {
            loss::betti_terms_grad<T>(voxels, static_cast<std::int64_t>(n), ndim, index_p.data(), sizes_p.data(),
                                      static_cast<const T*>(coef.data()), upstream.data(), out, first, last);
        });
    };
    if (coef.dtype() == nb::dtype<float>()) run(0.0f);
    else if (coef.dtype() == nb::dtype<double>()) run(0.0);
    else throw nb::type_error("betti_loss_grad: float32 or float64 only");
}

}  // namespace

NB_MODULE(_engine, m) {
    m.doc() = "medseg persistent-homology engine (C++): cubical barcodes and Betti matching";
    m.attr("max_points") = kMaxPoints;
    // A loss whose autograd graph is still alive when the interpreter exits (a script's
    // top-level `v = loss(x, y); v.backward()`) keeps its prepared targets alive through
    // torch's C++ graph, which Python's shutdown never frees: nanobind then printed
    // "leaked 2 instances ... reference counting issue" at every such exit. Nothing leaks
    // while the process runs (the cache is bounded and freed with the loss).
    nb::set_leak_warnings(false);
    host::HostOpenMP::get();  // from now on a fork marks the child (see run_team)
    m.def(
        "use_openmp_team", [](bool enabled) { host::HostOpenMP::get().set_enabled(enabled); }, nb::arg("enabled"),
        "Whether the engine's threads may be a parallel region of the process's OpenMP runtime (PyTorch's); "
        "medseg switches it off in forked and multiprocessing children (host_passes.hpp, run_team)");
    m.def(
        "openmp_team", [](int threads) { return host::HostOpenMP::get().usable(threads) != nullptr; },
        nb::arg("threads") = 2,
        "Whether `threads` engine threads would now be a parallel region of the process's OpenMP runtime");
    m.def(
        "pair_threads",
        [](std::size_t pairs, int threads) {
            std::vector<int> out(pairs);
            for (std::size_t i = 0; i < pairs; ++i) out[i] = host::threads_of_job(i, pairs, threads);
            return out;
        },
        nb::arg("pairs"), nb::arg("threads"),
        "The threads each pair of a batch of `pairs` runs its own task graph on when a matching batch is given "
        "`threads` threads: the intersection comparison and the cpu-parallel backend (with the union comparison "
        "the CPU engine puts all pairs' tasks into one graph)");

    nb::class_<Prepared>(m, "PreparedImage", "The target-only part of a Betti matching, reusable across calls")
        .def_ro("nbytes", &Prepared::nbytes);

    m.def("release_cached_memory", &release_cached_memory,
          "Frees the engine's cached working memory (big_vector.hpp); returns the bytes freed");
    m.def("cached_memory_bytes", &cached_memory_bytes, "Bytes of working memory the engine keeps for reuse");
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
        "skeletonize",
        [](nb::ndarray<const std::uint8_t, nb::c_contig, nb::device::cpu> mask, bool full_connectivity, int threads) {
            if (mask.ndim() != 2 && mask.ndim() != 3) throw nb::value_error("skeletonize expects a 2D or 3D array");
            const int ndim = static_cast<int>(mask.ndim());
            std::int64_t shape[3] = {0, 0, 0};
            std::size_t out_shape[3] = {0, 0, 0};
            for (int a = 0; a < ndim; ++a) shape[a] = static_cast<std::int64_t>(out_shape[a] = mask.shape(a));
            auto* skeleton = new std::vector<std::uint8_t>();
            {
                nb::gil_scoped_release release;
                *skeleton = skeletonize_mask(mask.data(), ndim, shape, full_connectivity, threads);
            }
            nb::capsule owner(skeleton, [](void* p) noexcept { delete static_cast<std::vector<std::uint8_t>*>(p); });
            return nb::ndarray<nb::numpy, std::uint8_t>(skeleton->data(), static_cast<std::size_t>(ndim), out_shape, owner);
        },
        nb::arg("mask"), nb::arg("full_connectivity"), nb::arg("threads"),
        "Topology-preserving thinning of a binary uint8 mask (skeleton.hpp); returns uint8 0/1");
    m.def(
        "is_simple_point",
        [](std::uint32_t config, int ndim, bool full_connectivity) {
            if (ndim != 2 && ndim != 3) throw nb::value_error("ndim must be 2 or 3");
            return is_simple_point(config, ndim, full_connectivity);
        },
        nb::arg("config"), nb::arg("ndim"), nb::arg("full_connectivity"),
        "Whether the centre of a 3^ndim neighbourhood (bit k = neighbour k in C order) is simple");

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
            return matching_of(a, b, superlevel, construction, include_a, include_b, threads, intersection,
                               [](const ImageView& x, const ImageView& y, const Options& o) { return compute_matching_parallel(x, y, o); });
        },
        nb::arg("a"), nb::arg("b"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("include_a"),
        nb::arg("include_b"), nb::arg("threads"), nb::arg("intersection") = false,
        "matching() by the CUDA backend's algorithm on CPU threads (backend='cpu-parallel'; same result)");

    m.def(
        "matching_batch_parallel",
        [](std::vector<InArray> as, std::vector<InArray> bs, bool superlevel, const std::string& construction,
           bool include_a, bool include_b, int threads, bool intersection) {
            return matching_batch_of(superlevel, construction, include_a, include_b, intersection,
                                     [&](const Options& o) {
                                         return matching_results(as, bs, o, threads,
                                                                 [](std::size_t, const ImageView& a, const ImageView& b,
                                                                    const Options& oi) {
                                                                     return compute_matching_parallel(a, b, oi);
                                                                 });
                                     });
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
            return matching_of(a, b, superlevel, construction, include_a, include_b, threads, intersection,
                               [](const ImageView& x, const ImageView& y, const Options& o) { return compute_matching(x, y, o); });
        },
        nb::arg("a"), nb::arg("b"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("include_a"),
        nb::arg("include_b"), nb::arg("threads"), nb::arg("intersection") = false);

    m.def(
        "matching_batch",
        [](std::vector<InArray> as, std::vector<InArray> bs, bool superlevel, const std::string& construction,
           bool include_a, bool include_b, int threads, PreparedList prepared, bool intersection) {
            return matching_batch_of(superlevel, construction, include_a, include_b, intersection,
                                     [&](const Options& o) { return engine_matchings(as, bs, o, threads, prepared); });
        },
        nb::arg("a"), nb::arg("b"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("include_a"),
        nb::arg("include_b"), nb::arg("threads"), nb::arg("prepared") = nb::none(),
        nb::arg("intersection") = false);

    m.def("matching_batch_indices", &matching_batch_indices, nb::arg("a"), nb::arg("b"), nb::arg("superlevel"),
          nb::arg("construction"), nb::arg("threads"), nb::arg("prepared") = nb::none(),
          nb::arg("intersection") = false, nb::arg("report_b") = true,
          "matching_batch() with every unmatched pair, as (index_a, sizes_a, index_b, sizes_b): flat indices "
          "into the batch, key by key (matched birth, death, unmatched birth, death), instance, dimension; "
          "sizes (4, instances, ndim); b's indices only with report_b");

    m.def("betti_loss_terms", &betti_loss_terms, nb::arg("values"), nb::arg("values_t"), nb::arg("index_p"),
          nb::arg("sizes_p"), nb::arg("index_t").none(), nb::arg("sizes_t"), nb::arg("superlevel"),
          nb::arg("matched_weight"), nb::arg("unmatched_weight"), nb::arg("push_unmatched"), nb::arg("threshold"),
          nb::arg("dimension_weights").none(), nb::arg("per_instance"), nb::arg("counted"), nb::arg("coef"),
          nb::arg("threads") = 1,
          "The Betti matching loss's per-instance sums over a batch's pairs (loss_terms.hpp): adds into "
          "per_instance and counted, writes coef (the derivative at each index); values_t empty: 0/1 target; "
          "instances spread over threads");
    m.def("betti_loss_grad", &betti_loss_grad, nb::arg("coef"), nb::arg("index_p"), nb::arg("sizes_p"),
          nb::arg("upstream"), nb::arg("grad"), nb::arg("threads") = 1,
          "grad[i][voxel of index_p[j]] += coef[j] * upstream[i] for the entries j of instance i "
          "(grad: one array per instance)");
}
