// Transparent huge pages for large CPU tensors. A UNet call on a CPU streams tens of megabytes of weights and
// activations through layers that compute little per byte (the low-resolution convolutions read 59 MB of weights
// for a few output pixels); with 4 KiB pages the TLB misses alone made tomeserve's SD 1.5 UNet ~1.2x slower than
// diffusers' on a CPU without AVX-512 (docs/benchmarks.md). Most kernels default THP to "madvise", so memory
// gets huge pages only when asked.
#pragma once

namespace tomeserve::pipeline {

// Installs, once, a CPU allocator that serves requests of 2 MiB and more from 2 MiB-aligned memory advised
// MADV_HUGEPAGE, and everything smaller from libtorch's default allocator. Affects tensors allocated afterwards;
// call it at the start of main(). Returns whether it is installed (false off Linux). Thread-safe.
bool EnableHugePageAllocations();

// Whether EnableHugePageAllocations() is in force.
bool HugePageAllocationsEnabled();

}  // namespace tomeserve::pipeline
