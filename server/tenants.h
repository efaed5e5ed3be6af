// Tenants: who a call belongs to (named by its bearer token in --auth-token-file, server/auth.h) and the
// per-tenant limits that keep one tenant from crowding out the others. Fair sharing of the workers between
// tenants is the batching policy's (AssignFairStarts in server/batching_policy.h); this file holds what is
// enforced when a call arrives. Torch- and gRPC-free.
#pragma once

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tomeserve::server {

// One tenant as the token file declares it ("TOKEN tenant=NAME weight=W max_concurrent=N calls_per_second=R").
struct TenantSpec {
  std::string name = "default";
  double weight = 1;            // share of the workers among tenants with queued calls
  int max_concurrent = 0;       // calls accepted and not yet answered; 0: no limit
  double calls_per_second = 0;  // sustained rate (token bucket, burst max(1, rate)); 0: no limit

  bool operator==(const TenantSpec&) const = default;
};

// Admission limits per tenant, checked as a call arrives (gRPC threads; a map lookup and a few counters).
// Thread-safe.
class TenantLimits {
 public:
  // OK and one of the tenant's concurrency slots held (give it back with Release), or RESOURCE_EXHAUSTED
  // naming the limit and the tenant.
  absl::Status Acquire(const TenantSpec& tenant, absl::Time now);
  void Release(const std::string& tenant);
  int in_flight(const std::string& tenant) const;

 private:
  struct State {
    int in_flight = 0;
    double tokens = 0;
    absl::Time refilled = absl::InfinitePast();
  };
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, State> state_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tomeserve::server
