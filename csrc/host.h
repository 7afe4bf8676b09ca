// Host-side primitives of interlace._C: POSIX shared memory and 32-bit flags with
// release/acquire ordering, usable across processes that map the same memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace interlace {

// Create (exclusively) and map `nbytes` of shared memory named `name`; returns the address.
uintptr_t shm_create(const std::string& name, size_t nbytes);
// Map an existing segment, which must hold exactly `nbytes`.
uintptr_t shm_attach(const std::string& name, size_t nbytes);
// Remove the name (mappings stay valid). False if it did not exist.
bool shm_remove(const std::string& name);
void unmap(uintptr_t address, size_t nbytes);

void flag_store(uintptr_t address, int32_t value);  // release
int32_t flag_load(uintptr_t address);              // acquire
// Spin, then back off, until (int32)(flag - value) >= 0 or `timeout_s` passes; returns the
// last value observed (the caller decides whether it was reached).
int32_t flag_wait(uintptr_t address, int32_t value, double timeout_s);
bool flag_reached(int32_t observed, int32_t value);

// Throws std::invalid_argument unless the five per-chunk lists of a copy_chunks call are equally long.
void check_chunk_lists(size_t dst, size_t src, size_t nbytes, size_t flags, size_t values);
// memcpy each chunk, then store its flag (release); a flag address of 0 means none.
void copy_chunks(const std::vector<uintptr_t>& dst, const std::vector<uintptr_t>& src,
                 const std::vector<size_t>& nbytes, const std::vector<uintptr_t>& flags,
                 const std::vector<int32_t>& values);

}  // namespace interlace
