// The progress line tomeserve-cli generate draws on stderr while a GenerateStream call runs: the queue
// position while queued, then a bar with step i/n. Drawn only when stderr is a terminal, so logs and pipes
// stay clean. Single-threaded: owned and called by the thread reading the stream.
#pragma once

#include <chrono>
#include <cstdint>

namespace tomeserve::tools {

class ProgressLine {
 public:
  // enabled = false draws nothing (not a terminal, or --quiet).
  explicit ProgressLine(bool enabled);
  ~ProgressLine() { Clear(); }

  // `estimated_start_seconds` < 0: the server gave no estimate.
  void Queued(uint32_t position, double estimated_start_seconds = -1);
  void Step(uint32_t step, uint32_t num_steps);
  // Erases the line (before the summary or an error message is printed).
  void Clear();

 private:
  void Draw(const char* text);

  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace tomeserve::tools
