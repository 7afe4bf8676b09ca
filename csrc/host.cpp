#include "host.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace interlace {
namespace {

[[noreturn]] void fail(const std::string& what, int error) {
  throw std::runtime_error(what + ": " + std::strerror(error));
}

void* map_fd(int fd, size_t nbytes, const std::string& name) {
  void* p = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int error = errno;
  close(fd);
  if (p == MAP_FAILED) fail("mmap of shared memory " + name, error);
  return p;
}

}  // namespace

uintptr_t shm_create(const std::string& name, size_t nbytes) {
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) fail("shm_open(create) " + name, errno);
  if (ftruncate(fd, static_cast<off_t>(nbytes)) != 0) {
    int error = errno;
    close(fd);
    shm_unlink(name.c_str());
    fail("ftruncate of shared memory " + name + " to " + std::to_string(nbytes) + " bytes", error);
  }
  try {
    return reinterpret_cast<uintptr_t>(map_fd(fd, nbytes, name));
  } catch (...) {
    shm_unlink(name.c_str());
    throw;
  }
}

uintptr_t shm_attach(const std::string& name, size_t nbytes) {
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) fail("shm_open(attach) " + name, errno);
  struct stat st {};
  if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != nbytes) {
    close(fd);
    throw std::runtime_error("shared memory " + name + " holds " + std::to_string(st.st_size) +
                             " bytes, expected " + std::to_string(nbytes));
  }
  return reinterpret_cast<uintptr_t>(map_fd(fd, nbytes, name));
}

bool shm_remove(const std::string& name) {
  if (shm_unlink(name.c_str()) == 0) return true;
  if (errno == ENOENT) return false;
  fail("shm_unlink " + name, errno);
}

void unmap(uintptr_t address, size_t nbytes) {
  if (munmap(reinterpret_cast<void*>(address), nbytes) != 0) fail("munmap", errno);
}

void flag_store(uintptr_t address, int32_t value) {
  __atomic_store_n(reinterpret_cast<int32_t*>(address), value, __ATOMIC_RELEASE);
}

int32_t flag_load(uintptr_t address) {
  return __atomic_load_n(reinterpret_cast<int32_t*>(address), __ATOMIC_ACQUIRE);
}

bool flag_reached(int32_t observed, int32_t value) {
  // The wrap-around comparison of CU_STREAM_WAIT_VALUE_GEQ: (int32)(observed - value) >= 0.
  return static_cast<int32_t>(static_cast<uint32_t>(observed) - static_cast<uint32_t>(value)) >= 0;
}

int32_t flag_wait(uintptr_t address, int32_t value, double timeout_s) {
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration<double>(timeout_s);
  auto pause = std::chrono::microseconds(1);
  for (int spins = 0;; ++spins) {
    int32_t observed = flag_load(address);
    if (flag_reached(observed, value) || clock::now() >= deadline) return observed;
    if (spins < 1000) continue;  // a peer is usually microseconds away: spin first
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(200));
  }
}

void check_chunk_lists(size_t dst, size_t src, size_t nbytes, size_t flags, size_t values) {
  if (src != dst || nbytes != dst || flags != dst || values != dst) {
    throw std::invalid_argument("copy_chunks: per-chunk lists differ in length (dst " + std::to_string(dst) + ", src " +
                                std::to_string(src) + ", nbytes " + std::to_string(nbytes) + ", flags " +
                                std::to_string(flags) + ", values " + std::to_string(values) + ")");
  }
}

void copy_chunks(const std::vector<uintptr_t>& dst, const std::vector<uintptr_t>& src,
                 const std::vector<size_t>& nbytes, const std::vector<uintptr_t>& flags,
                 const std::vector<int32_t>& values) {
  check_chunk_lists(dst.size(), src.size(), nbytes.size(), flags.size(), values.size());
  for (size_t i = 0; i < dst.size(); ++i) {
    if (nbytes[i] != 0)  // an empty tensor's pointer may be null, which memcpy must not get
      std::memcpy(reinterpret_cast<void*>(dst[i]), reinterpret_cast<const void*>(src[i]), nbytes[i]);
    if (flags[i] != 0) flag_store(flags[i], values[i]);
  }
}

}  // namespace interlace
