// nanobind module medseg.topology._engine_cuda: the CUDA backend. A separate module so
// that importing medseg.topology never loads CUDA; the runtime is linked statically,
// so importing this one needs no libcudart either (only a driver to do any work).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <vector>

#include "../py_results.hpp"
#include "engine_cuda.hpp"

namespace nb = nanobind;
using namespace medseg;

namespace {

// Host (numpy) or CUDA (torch, CuPy: DLPack) arrays, C-contiguous float32/float64.
using AnyArray = nb::ndarray<nb::c_contig>;

ImageView view_of(const AnyArray& arr, int& device_id) {
    ImageView v;
    if (arr.dtype() == nb::dtype<float>()) v.dtype = DType::Float32;
    else if (arr.dtype() == nb::dtype<double>()) v.dtype = DType::Float64;
    else throw nb::type_error("engine expects float32 or float64 arrays");
    if (arr.ndim() != 2 && arr.ndim() != 3) throw nb::value_error("engine expects 2D or 3D arrays");
    if (arr.device_type() == nb::device::cuda::value) device_id = arr.device_id();
    else if (arr.device_type() == nb::device::cpu::value) device_id = -1;
    else throw nb::type_error("engine expects host or CUDA arrays");
    v.ndim = static_cast<int>(arr.ndim());
    for (int a = 0; a < v.ndim; ++a) v.shape[a] = static_cast<std::int64_t>(arr.shape(a));
    v.data = arr.data();
    return v;
}

}  // namespace

NB_MODULE(_engine_cuda, m) {
    m.doc() = "medseg persistent-homology engine, CUDA backend (see csrc/CUDA.md)";
    m.attr("built_with_cuda") = true;
    cuda::init_host_threads();  // from now on a fork marks the child
    m.def("use_openmp_team", &cuda::use_openmp_team, nb::arg("enabled"),
          "Whether the host passes' threads may be a parallel region of the process's OpenMP runtime");
#ifdef MEDSEG_CUDA_ARCHITECTURES_TEXT
    m.attr("cuda_architectures") = MEDSEG_CUDA_ARCHITECTURES_TEXT;  // e.g. "80 90"
#endif
#ifdef MEDSEG_CUDA_COMPILER_VERSION
    m.attr("cuda_compiler_version") = MEDSEG_CUDA_COMPILER_VERSION;
#endif
    m.def("device_count", &cuda::device_count, "CUDA devices usable here (0 without driver or device)");
    m.def("runtime_version", &cuda::runtime_version);
    m.def(
        "barcode",
        [](AnyArray image, bool superlevel, const std::string& construction) {
            int device_id = -1;
            const ImageView v = view_of(image, device_id);
            const Options o = py::make_options(superlevel, construction, true, true, 1);
            BarcodeResult r;
            {
                nb::gil_scoped_release release;
                r = cuda::barcode(v, device_id, o);
            }
            return py::barcode_to_python(std::move(r));
        },
        nb::arg("image"), nb::arg("superlevel"), nb::arg("construction"));
    m.def(
        "matching",
        [](AnyArray a, AnyArray b, bool superlevel, const std::string& construction, bool include_a,
           bool include_b, int threads, bool intersection) {
            int da = -1, db = -1;
            const ImageView va = view_of(a, da), vb = view_of(b, db);
            if (da != db) throw nb::value_error("both images must be on the same device");
            const Options o = py::make_options(superlevel, construction, include_a, include_b, threads, intersection);
            MatchingResult r;
            {
                nb::gil_scoped_release release;
                r = cuda::matching(va, vb, da, o);
            }
            return py::matching_to_python(std::move(r));
        },
        nb::arg("a"), nb::arg("b"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("include_a"),
        nb::arg("include_b"), nb::arg("threads"), nb::arg("intersection") = false,
        "The Betti matching on the device (same result as _engine.matching)");
    m.def(
        "matching_batch",
        [](std::vector<AnyArray> as, std::vector<AnyArray> bs, bool superlevel, const std::string& construction,
           bool include_a, bool include_b, int streams, bool intersection) {
            if (as.size() != bs.size()) throw nb::value_error("batches differ in length");
            std::vector<ImageView> va, vb;
            int dev = -2;
            for (std::size_t i = 0; i < as.size(); ++i) {
                int da = -1, db = -1;
                va.push_back(view_of(as[i], da));
                vb.push_back(view_of(bs[i], db));
                if (da != db || (dev != -2 && da != dev))
                    throw nb::value_error("all images of a batch must be on the same device");
                dev = da;
            }
            const Options o = py::make_options(superlevel, construction, include_a, include_b, 1, intersection);
            std::vector<MatchingResult> rs;
            {
                nb::gil_scoped_release release;
                rs = cuda::matching_batch(va, vb, dev == -2 ? -1 : dev, o, streams);
            }
            nb::list out;
            for (auto& r : rs) out.append(py::matching_to_python(std::move(r)));
            return out;
        },
        nb::arg("a"), nb::arg("b"), nb::arg("superlevel"), nb::arg("construction"), nb::arg("include_a"),
        nb::arg("include_b"), nb::arg("streams") = 4, nb::arg("intersection") = false,
        "matching() of many pairs on several CUDA streams");
}
