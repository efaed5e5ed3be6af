// What the server asks about its devices, outside the workers: which devices "--devices" names, the versions
// for tomeserve_build_info, product names, and memory readings for tomeserve_device_memory_bytes. Torch-free
// header (device_probe.cpp is a torch translation unit), so main compiles without torch.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace c10 {
struct Device;
}  // namespace c10

namespace tomeserve::server {

// "auto" -> every CUDA device ("cuda:0", ...) or {"cpu"}; "cpu"; "cuda:0,cuda:1". Checks that devices exist.
absl::StatusOr<std::vector<std::string>> ResolveDevices(const std::string& spec);

// The libtorch version, and the CUDA runtime version it was built with ("none" without CUDA).
struct RuntimeVersions {
  std::string torch, cuda;
};
RuntimeVersions GetRuntimeVersions();
// "cpu", or a CUDA device's product name ("NVIDIA H200").
std::string DeviceProductName(const std::string& device);

// The CUDA caching allocator's allocated/reserved/peak bytes on a CUDA device; the process's resident set
// ("rss") on the CPU. Any thread.
struct MemoryReading {
  std::string kind;
  double bytes = 0;
};
std::vector<MemoryReading> ReadDeviceMemory(const c10::Device& device);

}  // namespace tomeserve::server
