// KeydMetrics: the key service's Prometheus metrics. The names are a public contract (dashboards
// and alerts depend on them): add, never rename.
//
//   custody_keyd_requests_total{method,code}            RPCs answered, by gRPC status code
//   custody_keyd_signatures_total{key,scheme,code}      Sign calls, by key, scheme and outcome
//   custody_keyd_sign_duration_seconds{key,scheme}      time from arrival to answer, signed OK
//   custody_keyd_signs_in_flight                        Sign calls being served now
//   custody_keyd_hsm_sessions                           size of the HSM session pool
//   custody_keyd_certificate_not_after_seconds{key,version}  leaf certificate expiry
#pragma once

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "absl/status/statusor.h"
#include "common/metrics_endpoint.h"

namespace custody::keyservice {

class KeydMetrics {
 public:
  KeydMetrics();

  // Serve starts the /metrics endpoint on `listen` (host:port). Returns the bound port.
  [[nodiscard]] absl::StatusOr<uint16_t> Serve(const std::string& listen);

  // Record* are thread-safe.
  void RecordRequest(const std::string& method, const std::string& code);
  void RecordSign(const std::string& key, const std::string& scheme, const std::string& code,
                  double seconds);
  void SignStarted() { in_flight_.Increment(); }
  void SignFinished() { in_flight_.Decrement(); }
  void SetSessions(double n) { sessions_.Set(n); }
  void SetCertificateNotAfter(const std::string& key, uint32_t version, double unix_seconds);

  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Counter>& signatures_;
  prometheus::Family<prometheus::Histogram>& sign_duration_;
  prometheus::Gauge& in_flight_;
  prometheus::Gauge& sessions_;
  prometheus::Family<prometheus::Gauge>& not_after_;
  MetricsEndpoint endpoint_;

  // Series already made, by their label values joined with '\0': Family::Add builds a label
  // map and hashes it on every call, which the signing path should not pay.
  struct SignSeries {
    prometheus::Counter* signatures;
    prometheus::Histogram* duration;  // Null unless code is OK.
  };
  std::mutex cache_mu_;  // Guards the two maps below.
  std::unordered_map<std::string, prometheus::Counter*> request_series_;
  std::unordered_map<std::string, SignSeries> sign_series_;
};

}  // namespace custody::keyservice
