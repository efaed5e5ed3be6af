#include "server/admission.h"

#include <cmath>
#include <optional>
#include <vector>

#include "absl/strings/str_format.h"
#include "server/scheduler.h"

namespace tomeserve::server {

std::vector<double> ControllerGrid(double min_ratio, double max_ratio) {
  std::vector<double> grid{min_ratio};
  // Grid points as exact two-decimal values (k * 5 / 100), so labels and int(N * ratio) are stable.
  for (int k = static_cast<int>(std::floor(min_ratio * 20.0 + 1e-9)) + 1; k * 0.05 < max_ratio - 1e-9; ++k) {
    grid.push_back(static_cast<double>(k * 5) / 100.0);
  }
  if (max_ratio > min_ratio) grid.push_back(max_ratio);
  return grid;
}

AdmissionDecision DecideAdmission(const Job& job, const RunningView& running, const StepTimeModel* model,
                                  absl::Time now) {
  const GenerationRequest& req = job.request();
  AdmissionDecision d{.tome = req.tome};
  const int rows = req.rows();
  const int steps = req.key.steps;
  const double waited = absl::ToDoubleSeconds(now - job.enqueued());
  // Predicted seconds from now to the job's last step if it runs at `ratio`; nullopt without a model.
  auto remaining = [&](double ratio) -> std::optional<double> {
    if (model == nullptr) return std::nullopt;
    std::optional<double> step =
        model->Predict(req.latent_pixels(), running.rows + rows, running.tome_rows + rows * ratio);
    if (!step) return std::nullopt;
    return steps * *step;
  };

  if (req.latency_target_seconds > 0 && req.tome_max_ratio > req.tome.ratio) {
    d.slo.applied = true;
    d.slo.target_seconds = req.latency_target_seconds;
    if (remaining(req.tome.ratio).has_value()) {
      double chosen = req.tome_max_ratio;
      double predicted = 0;
      for (double ratio : ControllerGrid(req.tome.ratio, req.tome_max_ratio)) {
        predicted = waited + *remaining(ratio);
        chosen = ratio;
        if (predicted <= req.latency_target_seconds) {
          d.slo.target_met = true;
          break;
        }
      }
      d.tome.ratio = chosen;
      d.slo.predicted_seconds = predicted;
    }
  }

  if (job.deadline() != absl::InfiniteFuture()) {
    if (std::optional<double> left = remaining(d.tome.ratio)) {
      const double until_deadline = absl::ToDoubleSeconds(job.deadline() - now);
      if (*left > until_deadline) {
        d.refusal = absl::DeadlineExceededError(absl::StrFormat(
            "refused at admission: predicted to need %.3f s more (%d steps) but the call's deadline is in %.3f s",
            *left, steps, until_deadline));
      }
    }
  }
  return d;
}

}  // namespace tomeserve::server
