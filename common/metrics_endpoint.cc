#include "common/metrics_endpoint.h"

#include <exception>

#include "absl/strings/str_cat.h"

namespace custody {

absl::StatusOr<MetricsEndpoint> ServeMetrics(
    const std::string& listen, const std::shared_ptr<prometheus::Registry>& registry) {
  MetricsEndpoint endpoint;
  try {
    // prometheus-cpp (civetweb) reports a failed bind by exception; it stops here.
    endpoint.exposer = std::make_unique<prometheus::Exposer>(listen, /*num_threads=*/1);
  } catch (const std::exception& e) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot serve metrics on ", listen, ": ", e.what()));
  }
  endpoint.exposer->RegisterCollectable(registry);
  const auto ports = endpoint.exposer->GetListeningPorts();
  endpoint.port = ports.empty() ? uint16_t{0} : static_cast<uint16_t>(ports.front());
  return endpoint;
}

prometheus::Histogram::BucketBoundaries DoublingBuckets(double from, double to) {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = from; v < to; v *= 2) {
    b.push_back(v);
  }
  return b;
}

}  // namespace custody
