// Python bindings of interlace._C. Addresses are plain integers (tensor.data_ptr()); the
// Python layer (interlace.engine.comm.signals, .symmetric) checks arguments and builds tensors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "device.h"
#include "host.h"

namespace py = pybind11;
using namespace interlace;

namespace {

// DLPack's ABI (dlpack.h, v0.8 "dltensor" capsules), declared here: the GPU box builds offline.
struct DLDevice {
  int32_t device_type;  // 1: CPU, 2: CUDA
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 1: unsigned int
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // null: compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

struct ByteView {
  DLManagedTensor managed;
  int64_t shape[1];
};

void delete_view(DLManagedTensor* managed) { delete static_cast<ByteView*>(managed->manager_ctx); }

void delete_unconsumed(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {  // a consumer renames the capsule and owns the view
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    managed->deleter(managed);
  }
}

// A DLPack capsule viewing `nbytes` bytes at `address` as uint8 on the given device, which it
// states rather than asks the pointer: CUDA reports IPC-mapped memory as its owner's device, and
// torch would then copy a peer's buffer to ours instead of viewing it. The memory is not owned.
py::capsule byte_view(uintptr_t address, int64_t nbytes, int32_t device_type, int32_t device_id) {
  auto* view = new ByteView{};
  view->shape[0] = nbytes;
  view->managed.dl_tensor = {reinterpret_cast<void*>(address), {device_type, device_id}, 1, {1, 8, 1}, view->shape, nullptr, 0};
  view->managed.manager_ctx = view;
  view->managed.deleter = delete_view;
  PyObject* capsule = PyCapsule_New(&view->managed, "dltensor", delete_unconsumed);
  if (capsule == nullptr) {
    delete view;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(capsule);
}

}  // namespace

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

  m.def("byte_view", &byte_view, py::arg("address"), py::arg("nbytes"), py::arg("device_type"), py::arg("device_id"));

  m.def("device_malloc", &device_malloc, py::arg("nbytes"), py::arg("device"), py::arg("timeout_s"),
        py::call_guard<py::gil_scoped_release>());
  // cudaFree and the IPC calls can wait for the device: without the GIL, so the watchdog goes on.
  m.def("device_free", &device_free, py::arg("address"), py::arg("device"), py::call_guard<py::gil_scoped_release>());
  m.def("ipc_handle", [](uintptr_t address, int device) { return py::bytes(ipc_handle(address, device)); },
        py::arg("address"), py::arg("device"));
  m.def(
      "ipc_open",
      [](py::bytes handle, int device) {
        std::string bytes(handle);
        py::gil_scoped_release released;
        return ipc_open(bytes, device);
      },
      py::arg("handle"), py::arg("device"));
  m.def("ipc_close", &ipc_close, py::arg("address"), py::arg("device"), py::call_guard<py::gil_scoped_release>());
  // Enqueues can block on a full hardware queue: without the GIL, so other rank threads go on.
  m.def("stream_write_value", &stream_write_value, py::arg("stream"), py::arg("address"), py::arg("value"),
        py::call_guard<py::gil_scoped_release>());
  m.def("stream_wait_value", &stream_wait_value, py::arg("stream"), py::arg("address"), py::arg("value"),
        py::call_guard<py::gil_scoped_release>());
  m.def("copy_chunks_async", &copy_chunks_async, py::arg("stream"), py::arg("dst"), py::arg("src"),
        py::arg("nbytes"), py::arg("flags"), py::arg("values"), py::call_guard<py::gil_scoped_release>());
  m.def("stream_create", &stream_create, py::arg("device"));
  m.def("stream_idle", &stream_idle, py::arg("stream"));
  py::register_exception<DeviceTimeout>(m, "DeviceTimeout", PyExc_TimeoutError);
  m.def("device_load", &device_load, py::arg("address"), py::arg("device"), py::arg("timeout_s"),
        py::call_guard<py::gil_scoped_release>());
  m.def("relax_capture_mode", &relax_capture_mode);
}
