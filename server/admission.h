// What happens to a job the moment a worker admits it (never later: a sample's settings do not change
// mid-denoise): the SLO ratio controller picks its Token Merging ratio, and a job whose deadline the step-time
// model says cannot be met is refused with DEADLINE_EXCEEDED instead of being run and thrown away.
//
// The controller: when the request allows a ratio range [tome.ratio, tome_max_ratio] and has a latency target,
// it tries tome.ratio, then the 0.05 grid above it up to tome_max_ratio, and takes the first whose predicted
// end-to-end latency (time queued so far + steps x predicted step time of the batch it joins, with its rows at
// that ratio) meets the target; when none does it takes tome_max_ratio and reports target_met = false. Without
// a prediction yet it keeps tome.ratio. Pure function of its inputs; torch-free.
#pragma once

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "server/job.h"
#include "server/step_time_model.h"

namespace tomeserve::server {

struct RunningView;

struct AdmissionDecision {
  tome::TokenMerging tome;  // the settings to run with
  SloDecision slo;
  absl::Status refusal;     // not OK: finish the job with it instead of running it
};

// `running` is the batch the job would join (its rows and ToMe rows before the job); `model` may be null.
AdmissionDecision DecideAdmission(const Job& job, const RunningView& running, const StepTimeModel* model,
                                  absl::Time now);

// The ratios the controller tries, in order: `min_ratio`, then multiples of 0.05 above it, then `max_ratio`.
std::vector<double> ControllerGrid(double min_ratio, double max_ratio);

}  // namespace tomeserve::server
