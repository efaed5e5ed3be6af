#include "tools/client_progress.h"

#include <algorithm>
#include <cstdio>
#include <string>

namespace tomeserve::tools {

ProgressLine::ProgressLine(bool enabled) : enabled_(enabled), start_(std::chrono::steady_clock::now()) {}

void ProgressLine::Queued(uint32_t position, double estimated_start_seconds) {
  char text[96];
  if (estimated_start_seconds >= 0) {
    std::snprintf(text, sizeof(text), "queued: position %u, starts in ~%.1f s", position, estimated_start_seconds);
  } else {
    std::snprintf(text, sizeof(text), "queued: position %u", position);
  }
  Draw(text);
}

void ProgressLine::Step(uint32_t step, uint32_t num_steps) {
  constexpr uint32_t kWidth = 30;
  const uint32_t filled = num_steps > 0 ? std::min(step, num_steps) * kWidth / num_steps : 0;
  const std::string bar = std::string(filled, '#') + std::string(kWidth - filled, '.');
  char text[160];
  std::snprintf(text, sizeof(text), "[%s] step %u/%u", bar.c_str(), step, num_steps);
  Draw(text);
}

void ProgressLine::Draw(const char* text) {
  if (!enabled_) return;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  // \r + erase-to-end-of-line redraws in place.
  std::fprintf(stderr, "\r\033[K%s  %.1f s", text, elapsed);
  std::fflush(stderr);
  drawn_ = true;
}

void ProgressLine::Clear() {
  if (!drawn_) return;
  std::fputs("\r\033[K", stderr);
  std::fflush(stderr);
  drawn_ = false;
}

}  // namespace tomeserve::tools
