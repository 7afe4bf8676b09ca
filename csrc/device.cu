// interlace._C with CUDA: cudaMalloc'd IPC buffers, stream memory operations, copy-engine chunks.
// Linked against the static CUDA runtime only; driver functions come from
// cudaGetDriverEntryPointByVersion at first use, so importing never needs libcuda.
#include <cuda.h>  // driver types only
#include <cuda_runtime.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <unordered_map>

#include "device.h"
#include "host.h"

namespace interlace {
namespace {

using StreamValue32 = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using ErrorName = CUresult (*)(CUresult, const char**);
using CurrentContext = CUresult (*)(CUcontext*);
constexpr unsigned int kDriverApi = 12000;  // the CUDA 12 semantics of cuStream{Write,Wait}Value32

void check(cudaError_t error, const std::string& what) {
  if (error != cudaSuccess) {
    throw std::runtime_error(what + ": " + cudaGetErrorName(error) + " (" + cudaGetErrorString(error) + ")");
  }
}

template <typename Fn>
Fn driver_function(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  check(cudaGetDriverEntryPointByVersion(name, &fn, kDriverApi, cudaEnableDefault, &found),
        std::string("looking up driver function ") + name);
  if (found != cudaDriverEntryPointSuccess || fn == nullptr) {
    throw std::runtime_error(std::string("the CUDA driver has no ") + name + " (query result " + std::to_string(found) + ")");
  }
  return reinterpret_cast<Fn>(fn);
}

StreamValue32 write_value32() {
  static StreamValue32 fn = driver_function<StreamValue32>("cuStreamWriteValue32");
  return fn;
}

StreamValue32 wait_value32() {
  static StreamValue32 fn = driver_function<StreamValue32>("cuStreamWaitValue32");
  return fn;
}

void check_driver(CUresult result, const std::string& what) {
  if (result == CUDA_SUCCESS) return;
  static ErrorName error_name = driver_function<ErrorName>("cuGetErrorName");
  const char* name = nullptr;
  std::string known = error_name(result, &name) == CUDA_SUCCESS && name != nullptr ? std::string(name) + " " : "";
  throw std::runtime_error(what + ": CUDA driver error " + known + "(" + std::to_string(result) + ")");
}

// Selects a device for one call; restores the caller's device only if it switched from a thread
// that had a context. cudaGetDevice says 0 on a thread with none (a watchdog), and setting device
// 0 back would create a context there, hundreds of MB on another GPU of a multi-GPU node.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    static CurrentContext current = driver_function<CurrentContext>("cuCtxGetCurrent");
    CUcontext context = nullptr;
    check_driver(current(&context), "cuCtxGetCurrent");
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (context == nullptr || previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
      restore_ = context != nullptr;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

// This thread's capture mode relaxed for one call: calls such as cudaStreamQuery or
// cudaHostAlloc, made while another thread captures a graph in the default global mode, would
// otherwise fail and invalidate that capture.
class RelaxedCapture {
 public:
  RelaxedCapture() { check(cudaThreadExchangeStreamCaptureMode(&mode_), "relaxing this thread's capture mode"); }
  ~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// What device_load (kRead) or device_malloc's zero fill (kFill) goes through, per device: a
// private stream and a pinned slot, one use at a time. A use that timed out leaves its work queued:
// renew() swaps in a fresh stream and slot, so later uses do not queue behind it. Nothing is
// freed: a late copy may still land in an old slot.
struct Loader {
  std::mutex lock;
  cudaStream_t stream = nullptr;
  int32_t* slot = nullptr;

  void renew() {
    check(cudaHostAlloc(reinterpret_cast<void**>(&slot), sizeof(int32_t), cudaHostAllocPortable),
          "allocating a pinned slot for device reads");
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "creating a stream for device reads");
  }
};
enum Use { kRead, kFill };

Loader& loader(int device, Use use) {  // on `device` (the caller's DeviceGuard)
  static std::mutex lock;
  static std::unordered_map<int, Loader*> loaders;
  std::lock_guard<std::mutex> guard(lock);
  Loader*& found = loaders[2 * device + use];
  if (found == nullptr) {
    auto fresh = std::make_unique<Loader>();
    fresh->renew();
    found = fresh.release();
  }
  return *found;
}

// Polls `stream` until its work is done; past `timeout_s` seconds throws DeviceTimeout saying `what`.
void finish(cudaStream_t stream, double timeout_s, const std::string& what) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  cudaError_t state;
  while ((state = cudaStreamQuery(stream)) == cudaErrorNotReady) {
    if (std::chrono::steady_clock::now() >= end) {
      throw DeviceTimeout(what + " did not finish within " + std::to_string(static_cast<long long>(timeout_s * 1000)) +
                          " ms: it is queued behind work that is not finishing (a stream wait on a peer?)");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  check(state, what);
}

}  // namespace

bool cuda_built() { return true; }

std::string cuda_runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

int cuda_device_count(std::string& why) {
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    why = std::string(cudaGetErrorName(error)) + ": " + cudaGetErrorString(error);
    return -1;
  }
  why = std::to_string(count) + " device(s)";
  return count;
}

uintptr_t device_malloc(size_t nbytes, int device, double timeout_s) {
  RelaxedCapture relaxed;
  DeviceGuard guard(device);
  loader(device, kRead);  // made here, so a later flag read on a stuck device allocates nothing
  Loader& l = loader(device, kFill);
  void* p = nullptr;
  check(cudaMalloc(&p, nbytes), "cudaMalloc of " + std::to_string(nbytes) + " bytes");
  std::lock_guard<std::mutex> one_use(l.lock);
  try {  // on the private stream: the legacy default stream would also wait for torch's streams
    check(cudaMemsetAsync(p, 0, nbytes, l.stream), "zero-filling " + std::to_string(nbytes) + " bytes");
    finish(l.stream, timeout_s, "zero-filling " + std::to_string(nbytes) + " bytes of new device memory");
  } catch (const DeviceTimeout&) {  // the fill may still land: p stays allocated (cudaFree would wait for it)
    l.renew();
    throw;
  } catch (...) {
    cudaFree(p);
    throw;
  }
  return reinterpret_cast<uintptr_t>(p);
}

void device_free(uintptr_t address, int device) {
  RelaxedCapture relaxed;
  DeviceGuard guard(device);
  check(cudaFree(reinterpret_cast<void*>(address)), "cudaFree");
}

std::string ipc_handle(uintptr_t address, int device) {
  DeviceGuard guard(device);
  cudaIpcMemHandle_t handle;
  check(cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(address)), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

uintptr_t ipc_open(const std::string& bytes, int device) {
  if (bytes.size() != sizeof(cudaIpcMemHandle_t)) {
    throw std::runtime_error("an IPC handle has " + std::to_string(sizeof(cudaIpcMemHandle_t)) + " bytes, got " + std::to_string(bytes.size()));
  }
  RelaxedCapture relaxed;
  DeviceGuard guard(device);
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, bytes.data(), sizeof(handle));
  void* p = nullptr;
  check(cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
  return reinterpret_cast<uintptr_t>(p);
}

void ipc_close(uintptr_t address, int device) {
  RelaxedCapture relaxed;
  DeviceGuard guard(device);
  check(cudaIpcCloseMemHandle(reinterpret_cast<void*>(address)), "cudaIpcCloseMemHandle");
}

void stream_write_value(uintptr_t stream, uintptr_t address, int32_t value) {
  check_driver(write_value32()(reinterpret_cast<CUstream>(stream), static_cast<CUdeviceptr>(address),
                               static_cast<cuuint32_t>(value), CU_STREAM_WRITE_VALUE_DEFAULT),
               "cuStreamWriteValue32");
}

void stream_wait_value(uintptr_t stream, uintptr_t address, int32_t value) {
  check_driver(wait_value32()(reinterpret_cast<CUstream>(stream), static_cast<CUdeviceptr>(address),
                              static_cast<cuuint32_t>(value), CU_STREAM_WAIT_VALUE_GEQ),
               "cuStreamWaitValue32");
}

void copy_chunks_async(uintptr_t stream, const std::vector<uintptr_t>& dst, const std::vector<uintptr_t>& src,
                       const std::vector<size_t>& nbytes, const std::vector<uintptr_t>& flags,
                       const std::vector<int32_t>& values) {
  check_chunk_lists(dst.size(), src.size(), nbytes.size(), flags.size(), values.size());
  auto s = reinterpret_cast<cudaStream_t>(stream);
  for (size_t i = 0; i < dst.size(); ++i) {
    // An empty chunk copies nothing, and its pointers may lie one past an allocation's end, where
    // cudaMemcpyDefault cannot tell which memory they are: no copy, only its flag.
    if (nbytes[i] != 0)
      check(cudaMemcpyAsync(reinterpret_cast<void*>(dst[i]), reinterpret_cast<const void*>(src[i]), nbytes[i],
                            cudaMemcpyDefault, s),
            "cudaMemcpyAsync of chunk " + std::to_string(i));
    if (flags[i] != 0) stream_write_value(stream, flags[i], values[i]);
  }
}

uintptr_t stream_create(int device) {
  DeviceGuard guard(device);
  cudaStream_t s = nullptr;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "creating a stream on device " + std::to_string(device));
  return reinterpret_cast<uintptr_t>(s);
}

bool stream_idle(uintptr_t stream) {
  RelaxedCapture relaxed;
  cudaError_t state = cudaStreamQuery(reinterpret_cast<cudaStream_t>(stream));
  if (state == cudaErrorNotReady) return false;
  check(state, "querying a stream");
  return true;
}

void relax_capture_mode() {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  check(cudaThreadExchangeStreamCaptureMode(&mode), "setting this thread's capture mode to relaxed");
}

int32_t device_load(uintptr_t address, int device, double timeout_s) {
  RelaxedCapture relaxed;
  DeviceGuard guard(device);
  Loader& l = loader(device, kRead);
  std::lock_guard<std::mutex> one_read(l.lock);  // one slot: reads take turns, each within its deadline
  check(cudaMemcpyAsync(l.slot, reinterpret_cast<const void*>(address), sizeof(int32_t), cudaMemcpyDeviceToHost, l.stream),
        "reading a device flag");
  try {
    finish(l.stream, timeout_s, "the copy reading a device flag");
  } catch (const DeviceTimeout&) {
    l.renew();
    throw;
  }
  return *static_cast<volatile int32_t*>(l.slot);
}

}  // namespace interlace
