#include "pipeline/huge_pages.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace tomeserve::pipeline {
namespace {

size_t RoundToHugePages(size_t n) { return (n + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes; }

// aligned_alloc of whole huge pages, advised MADV_HUGEPAGE; release with free().
void* AllocateAdvised(size_t size) {
  void* ptr = std::aligned_alloc(kHugePageBytes, size);
#ifdef __linux__
  if (ptr != nullptr) ::madvise(ptr, size, MADV_HUGEPAGE);
#endif
  return ptr;
}

void FreeHuge(void* ptr) { std::free(ptr); }

// Large requests: AllocateAdvised. Small ones go to the allocator that was in force before (libtorch's default), deleter and all. Both
// kinds are released by free(), so the large ones take the default allocator's raw deleter (it frees with free()
// on Linux, after reporting to the profiler), and raw_allocate/raw_deallocate, which libtorch uses in places,
// work for both.
class HugePageAllocator final : public c10::Allocator {
 public:
  explicit HugePageAllocator(c10::Allocator* small)
      : small_(small), deleter_(small->raw_deleter() != nullptr ? small->raw_deleter() : &FreeHuge) {}

  c10::DeleterFnPtr raw_deleter() const override { return deleter_; }

  c10::DataPtr allocate(size_t n) override {
    if (n < kHugePageBytes) return small_->allocate(n);
    void* ptr = AllocateAdvised(RoundToHugePages(n));
    if (ptr == nullptr) return small_->allocate(n);  // the default allocator reports the failure its own way
    return {ptr, ptr, deleter_, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  c10::Allocator* small_;
  c10::DeleterFnPtr deleter_;
};

}  // namespace

std::shared_ptr<void> AllocateHugePages(size_t bytes) {
  void* ptr = AllocateAdvised(RoundToHugePages(bytes));
  return ptr == nullptr ? nullptr : std::shared_ptr<void>(ptr, &FreeHuge);
}

bool EnableHugePageAllocations() {
#ifdef __linux__
  static const bool done = [] {
    // Never destroyed: tensors it allocated may be freed during static destruction.
    static auto* allocator = new HugePageAllocator(c10::GetDefaultCPUAllocator());
    c10::SetCPUAllocator(allocator, /*priority=*/10);
    return true;
  }();
  return done;
#else
  return false;
#endif
}

}  // namespace tomeserve::pipeline
