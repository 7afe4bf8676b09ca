// interlace._C without CUDA: the device API exists and says why it cannot work.
#include <stdexcept>

#include "device.h"

namespace interlace {
namespace {
[[noreturn]] void unavailable() {
  throw std::runtime_error("interlace._C was built without CUDA (INTERLACE_CUDA=OFF, or no CUDA toolkit was found)");
}
}  // namespace

bool cuda_built() { return false; }
std::string cuda_runtime_version() { return ""; }
int cuda_device_count(std::string& why) {
  why = "interlace._C was built without CUDA";
  return -1;
}
uintptr_t device_malloc(size_t, int, double) { unavailable(); }
void device_free(uintptr_t, int) { unavailable(); }
std::string ipc_handle(uintptr_t, int) { unavailable(); }
uintptr_t ipc_open(const std::string&, int) { unavailable(); }
void ipc_close(uintptr_t, int) { unavailable(); }
void stream_write_value(uintptr_t, uintptr_t, int32_t) { unavailable(); }
void stream_wait_value(uintptr_t, uintptr_t, int32_t) { unavailable(); }
void copy_chunks_async(uintptr_t, const std::vector<uintptr_t>&, const std::vector<uintptr_t>&, const std::vector<size_t>&,
                       const std::vector<uintptr_t>&, const std::vector<int32_t>&) {
  unavailable();
}
uintptr_t stream_create(int) { unavailable(); }
bool stream_idle(uintptr_t) { unavailable(); }
int32_t device_load(uintptr_t, int, double) { unavailable(); }
void relax_capture_mode() { unavailable(); }

}  // namespace interlace
