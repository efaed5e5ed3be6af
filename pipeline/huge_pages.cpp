#include "pipeline/huge_pages.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdlib>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace tomeserve::pipeline {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

void FreeHuge(void* ptr) { std::free(ptr); }

// Large requests: aligned_alloc of whole huge pages, advised MADV_HUGEPAGE (advisory: without THP the memory is
// ordinary). Small ones go to the allocator that was in force before (libtorch's default), deleter and all. Both
// kinds are released by free(), so the large ones take the default allocator's raw deleter (it frees with free()
// on Linux, after reporting to the profiler), and raw_allocate/raw_deallocate, which libtorch uses in places,
// work for both.
class HugePageAllocator final : public c10::Allocator {
 public:
  explicit HugePageAllocator(c10::Allocator* small)
      : small_(small), deleter_(small->raw_deleter() != nullptr ? small->raw_deleter() : &FreeHuge) {}

  c10::DeleterFnPtr raw_deleter() const override { return deleter_; }

  c10::DataPtr allocate(size_t n) override {
    if (n < kHugePage) return small_->allocate(n);
    const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = std::aligned_alloc(kHugePage, size);
    if (ptr == nullptr) return small_->allocate(n);  // the default allocator reports the failure its own way
#ifdef __linux__
    ::madvise(ptr, size, MADV_HUGEPAGE);
#endif
    return {ptr, ptr, deleter_, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  c10::Allocator* small_;
  c10::DeleterFnPtr deleter_;
};

std::atomic<bool> installed{false};

}  // namespace

bool EnableHugePageAllocations() {
#ifdef __linux__
  static const bool done = [] {
    // Never destroyed: tensors it allocated may be freed during static destruction.
    static auto* allocator = new HugePageAllocator(c10::GetDefaultCPUAllocator());
    c10::SetCPUAllocator(allocator, /*priority=*/10);
    installed = true;
    return true;
  }();
  return done;
#else
  return false;
#endif
}

bool HugePageAllocationsEnabled() { return installed.load(); }

}  // namespace tomeserve::pipeline
