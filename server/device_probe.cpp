#include "server/device_probe.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "pipeline/device.h"

#ifdef TOMESERVE_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

namespace tomeserve::server {
namespace {

// Resident set size of this process in bytes (0 when unknown).
double ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  long pages = 0, resident = 0;
  if (!(statm >> pages >> resident)) return 0;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE));
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ResolveDevices(const std::string& spec) {
  std::vector<std::string> devices;
  if (spec == "auto") {
    const int n = at::globalContext().hasCUDA() ? static_cast<int>(at::getNumGPUs()) : 0;
    for (int i = 0; i < n; ++i) devices.push_back(absl::StrCat("cuda:", i));
    if (devices.empty()) devices.push_back("cpu");
    return devices;
  }
  for (absl::string_view d : absl::StrSplit(spec, ',', absl::SkipEmpty())) {
    absl::StatusOr<c10::Device> device = pipeline::ParseDevice(d);
    if (!device.ok())
      return absl::InvalidArgumentError(absl::StrCat("--devices: ", device.status().message()));
    // CPU workers are told apart by their name (cpu:0, cpu:1: one worker thread each, sharing the cores).
    const std::string name = absl::StartsWith(d, "cpu:") ? std::string(d) : device->str();
    if (std::find(devices.begin(), devices.end(), name) != devices.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--devices: ", name, " is listed twice", name == "cpu" ? " (several CPU workers: cpu:0,cpu:1)" : ""));
    }
    devices.push_back(name);
  }
  if (devices.empty()) return absl::InvalidArgumentError("--devices: empty");
  return devices;
}

RuntimeVersions GetRuntimeVersions() {
  RuntimeVersions v{.torch = TORCH_VERSION, .cuda = "none"};
#ifdef TOMESERVE_HAVE_CUDA
  v.cuda = absl::StrCat(CUDART_VERSION / 1000, ".", CUDART_VERSION % 1000 / 10);
#endif
  return v;
}

std::string DeviceProductName(const std::string& device) {
#ifdef TOMESERVE_HAVE_CUDA
  absl::StatusOr<c10::Device> d = pipeline::ParseDevice(device);
  cudaDeviceProp props;
  if (d.ok() && d->is_cuda() && cudaGetDeviceProperties(&props, d->index()) == cudaSuccess) return props.name;
#endif
  return device;
}

std::vector<MemoryReading> ReadDeviceMemory(const c10::Device& device) {
#ifdef TOMESERVE_HAVE_CUDA
  if (device.is_cuda()) {
    const c10::CachingDeviceAllocator::DeviceStats stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    return {{"allocated", static_cast<double>(stats.allocated_bytes[all].current)},
            {"reserved", static_cast<double>(stats.reserved_bytes[all].current)},
            {"peak", static_cast<double>(stats.allocated_bytes[all].peak)}};
  }
#endif
  return {{"rss", ResidentBytes()}};
}

}  // namespace tomeserve::server
