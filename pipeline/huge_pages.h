// Transparent huge pages for large CPU tensors. A UNet call on a CPU streams tens of megabytes of weights and
// activations through layers that compute little per byte (the low-resolution convolutions read 59 MB of weights
// for a few output pixels); with 4 KiB pages the TLB misses alone made tomeserve's SD 1.5 UNet ~1.2x slower than
// diffusers' on a CPU without AVX-512 (docs/benchmarks.md). Most kernels default THP to "madvise", so memory
// gets huge pages only when asked.
#pragma once

#include <cstddef>
#include <memory>

namespace tomeserve::pipeline {

// 2 MiB, the x86-64 transparent huge page.
inline constexpr size_t kHugePageBytes = size_t{2} << 20;

// `bytes` rounded up to whole huge pages, 2 MiB-aligned and advised MADV_HUGEPAGE (advisory: without THP it is
// ordinary memory); freed when the last copy of the pointer goes. Null when the allocation fails.
std::shared_ptr<void> AllocateHugePages(size_t bytes);

// Installs, once, a CPU allocator that serves requests of 2 MiB and more from 2 MiB-aligned memory advised
// MADV_HUGEPAGE, and everything smaller from libtorch's default allocator. Affects tensors allocated afterwards;
// call it at the start of main(). Returns whether it is installed (false off Linux). Thread-safe.
bool EnableHugePageAllocations();

}  // namespace tomeserve::pipeline
