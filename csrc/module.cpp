// Python bindings of interlace._C. Addresses are plain integers (tensor.data_ptr()); the
// Python layer (interlace.engine.comm.signals, .symmetric) checks arguments and builds tensors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "device.h"
#include "host.h"

namespace py = pybind11;
using namespace interlace;

PYBIND11_MODULE(_C, m) {
  m.doc() = "interlace native primitives: shared memory, flags, CUDA IPC, stream memory operations";
  m.def("build_info", [] {
    py::dict info;
    info["cuda"] = cuda_built();
    info["cuda_runtime"] = cuda_runtime_version();
#ifdef INTERLACE_CUDA_ARCHS
    info["cuda_archs"] = INTERLACE_CUDA_ARCHS;
#else
    info["cuda_archs"] = "";
#endif
    info["compiler"] = __VERSION__;
    return info;
  });
  m.def("cuda_device_count", [] {
    std::string why;
    int count = cuda_device_count(why);
    return py::make_tuple(count, why);
  });

  m.def("shm_create", &shm_create, py::arg("name"), py::arg("nbytes"));
  m.def("shm_attach", &shm_attach, py::arg("name"), py::arg("nbytes"));
  m.def("shm_remove", &shm_remove, py::arg("name"));
  m.def("unmap", &unmap, py::arg("address"), py::arg("nbytes"));
  m.def("flag_store", &flag_store, py::arg("address"), py::arg("value"));
  m.def("flag_load", &flag_load, py::arg("address"));
  m.def("flag_reached", &flag_reached, py::arg("observed"), py::arg("value"));
  m.def("flag_wait", &flag_wait, py::arg("address"), py::arg("value"), py::arg("timeout_s"),
        py::call_guard<py::gil_scoped_release>());
  m.def("copy_chunks", &copy_chunks, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("flags"),
        py::arg("values"), py::call_guard<py::gil_scoped_release>());

  m.def("device_malloc", &device_malloc, py::arg("nbytes"), py::arg("device"));
  m.def("device_free", &device_free, py::arg("address"), py::arg("device"));
  m.def("ipc_handle", [](uintptr_t address, int device) { return py::bytes(ipc_handle(address, device)); },
        py::arg("address"), py::arg("device"));
  m.def("ipc_open", [](py::bytes handle, int device) { return ipc_open(std::string(handle), device); },
        py::arg("handle"), py::arg("device"));
  m.def("ipc_close", &ipc_close, py::arg("address"), py::arg("device"));
  m.def("stream_write_value", &stream_write_value, py::arg("stream"), py::arg("address"), py::arg("value"));
  m.def("stream_wait_value", &stream_wait_value, py::arg("stream"), py::arg("address"), py::arg("value"));
  m.def("copy_chunks_async", &copy_chunks_async, py::arg("stream"), py::arg("dst"), py::arg("src"),
        py::arg("nbytes"), py::arg("flags"), py::arg("values"));
  m.def("device_load", &device_load, py::arg("address"), py::arg("device"), py::call_guard<py::gil_scoped_release>());
}
