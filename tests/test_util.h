// Helpers shared by the C++ parity tests: locating test data passed in by ctest, and the error measure every
// parity bound in docs/parity.md is stated in.
#pragma once

#include <cstdlib>
#include <filesystem>

#include <ATen/ATen.h>

namespace tomeserve::test {

// The path in environment variable `name` (set by tests/CMakeLists.txt), or an empty path when unset.
inline std::filesystem::path EnvPath(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::filesystem::path(v) : std::filesystem::path();
}

// ||got - want||_2 / ||want||_2 in float64, on the CPU; `got` may live on any device.
inline double RelErr(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor w = want.to(at::kDouble).cpu();
  return (got.to(at::kDouble).cpu() - w).norm().item<double>() / w.norm().item<double>();
}

}  // namespace tomeserve::test
