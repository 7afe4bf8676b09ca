// Device-side primitives of interlace._C. Implemented by device.cu when built with CUDA and by
// device_stub.cpp otherwise (each function then throws, naming why). Never links libcuda:
// driver functions are fetched at run time, so the module imports on machines without a driver.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace interlace {

// A device operation that did not finish in time (Python: interlace._C.DeviceTimeout, a TimeoutError).
struct DeviceTimeout : std::runtime_error {
  using std::runtime_error::runtime_error;
};

bool cuda_built();
std::string cuda_runtime_version();  // of the toolkit built against, e.g. "13.0"
// Devices visible, or a negative number when the runtime cannot start; `why` says what happened.
int cuda_device_count(std::string& why);

// Zero-filled, from cudaMalloc (IPC-able); the fill goes through a private stream, finished within
// `timeout_s` seconds or DeviceTimeout.
uintptr_t device_malloc(size_t nbytes, int device, double timeout_s);
void device_free(uintptr_t address, int device);
std::string ipc_handle(uintptr_t address, int device);  // 64 opaque bytes
uintptr_t ipc_open(const std::string& handle, int device);
void ipc_close(uintptr_t address, int device);

// Stream memory operations (cuStreamWriteValue32 / cuStreamWaitValue32 with GEQ).
void stream_write_value(uintptr_t stream, uintptr_t address, int32_t value);
void stream_wait_value(uintptr_t stream, uintptr_t address, int32_t value);
// cudaMemcpyAsync each chunk on `stream`, then write its flag (0: none) from the stream.
void copy_chunks_async(uintptr_t stream, const std::vector<uintptr_t>& dst, const std::vector<uintptr_t>& src,
                       const std::vector<size_t>& nbytes, const std::vector<uintptr_t>& flags,
                       const std::vector<int32_t>& values);
// A stream of our own (non-blocking), not one of torch's pool, which hands out 32 per priority
// round-robin: two "new" torch streams can be one CUDA stream, and a lane's stream wait would then
// hold back a peer's kernels. Never destroyed (see interlace.engine.device.new_stream).
uintptr_t stream_create(int device);
// Whether `stream` has finished its queued work (cudaStreamQuery, safe beside another thread's capture).
bool stream_idle(uintptr_t stream);
// Read one int32 of device memory through a private non-blocking stream (a copy engine), so a
// host can watch a flag while kernels hold the device's other streams. The copy can still queue
// behind blocked work (a stream sharing its hardware queue waits on a peer that never comes):
// after `timeout_s` seconds it throws DeviceTimeout; the late copy lands in a slot kept for it.
int32_t device_load(uintptr_t address, int device, double timeout_s);
// Let the calling thread make CUDA calls (event queries, flag reads) while another thread
// captures a CUDA graph in the default global mode, without invalidating that capture
// (cudaThreadExchangeStreamCaptureMode to relaxed, for this thread only).
void relax_capture_mode();

}  // namespace interlace
