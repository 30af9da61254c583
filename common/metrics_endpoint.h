// Prometheus helpers shared by custody-keyd and custody-proxy: the /metrics endpoint and the
// latency bucket layout.
#pragma once

#include <prometheus/exposer.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <sys/socket.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace custody {

// StopExposer deletes an Exposer without civetweb's wait of up to 2 s (see the .cc).
struct StopExposer {
  // The endpoint's own addresses, resolved when it started; knocked on while it stops.
  std::vector<sockaddr_storage> addresses;
  void operator()(prometheus::Exposer* exposer) const noexcept;
};

// MetricsEndpoint is a running /metrics HTTP endpoint.
struct MetricsEndpoint {
  std::unique_ptr<prometheus::Exposer, StopExposer> exposer;
  uint16_t port = 0;  // The bound port (useful when `listen` asked for port 0).
};

// ServeMetrics serves `registry` on `listen` (host:port). FAILED_PRECONDITION names the address
// when it cannot be bound.
[[nodiscard]] absl::StatusOr<MetricsEndpoint> ServeMetrics(
    const std::string& listen, const std::shared_ptr<prometheus::Registry>& registry);

// DoublingBuckets returns histogram bounds from `from`, doubling, below `to`.
prometheus::Histogram::BucketBoundaries DoublingBuckets(double from, double to);

}  // namespace custody
