#include "server/tenants.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tomeserve::server {

absl::Status TenantLimits::Acquire(const TenantSpec& tenant, absl::Time now) {
  absl::MutexLock lock(&mu_);
  State& s = state_[tenant.name];
  if (tenant.max_concurrent > 0 && s.in_flight >= tenant.max_concurrent) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant \"", tenant.name, "\" is at its limit of ", tenant.max_concurrent,
        " concurrent calls (max_concurrent in --auth-token-file); retry when one of its calls has finished"));
  }
  if (tenant.calls_per_second > 0) {
    const double burst = std::max(1.0, tenant.calls_per_second);
    if (s.refilled == absl::InfinitePast()) {
      s.tokens = burst;
    } else {
      s.tokens = std::min(burst, s.tokens + absl::ToDoubleSeconds(now - s.refilled) * tenant.calls_per_second);
    }
    s.refilled = now;
    if (s.tokens < 1) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "tenant \"%s\" is over its limit of %g calls per second (calls_per_second in --auth-token-file); "
          "retry in %.2f s",
          tenant.name, tenant.calls_per_second, (1 - s.tokens) / tenant.calls_per_second));
    }
    s.tokens -= 1;
  }
  ++s.in_flight;
  return absl::OkStatus();
}

void TenantLimits::Release(const std::string& tenant) {
  absl::MutexLock lock(&mu_);
  auto it = state_.find(tenant);
  if (it != state_.end() && it->second.in_flight > 0) --it->second.in_flight;
}

int TenantLimits::in_flight(const std::string& tenant) const {
  absl::MutexLock lock(&mu_);
  auto it = state_.find(tenant);
  return it == state_.end() ? 0 : it->second.in_flight;
}

}  // namespace tomeserve::server
