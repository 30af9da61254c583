// ProxyMetrics: custody-proxy's Prometheus metrics. The names are a public contract (dashboards
// and alerts depend on them): add, never rename.
//
//   custody_proxy_handshakes_total{listener,outcome}      ok, failed, timeout, aborted
//   custody_proxy_handshake_duration_seconds{listener}    accept to finished handshake
//   custody_proxy_sign_duration_seconds{key,scheme}       key-service signature, request to answer
//   custody_proxy_sign_errors_total{key,code}             signatures that failed, by status code
//   custody_proxy_signs_in_flight                         handshake signatures awaited now
//   custody_proxy_signing_socket_connected                workers connected to keyd's signing
//                                                         socket now
//   custody_proxy_signing_socket_requests_total{outcome}  signatures: sent (on the socket), grpc
//                                                         (sent over gRPC: socket down or full),
//                                                         moved (taken back to gRPC after
//                                                         sending: broken, keyd UNAVAILABLE)
//   custody_proxy_connections_open{listener}              client connections open now
//   custody_proxy_connections_total{listener,outcome}     closed connections: ok, backend_error,
//                                                         client_error, idle_timeout, drained
//   custody_proxy_bytes_total{listener,direction}         relayed: client_to_backend,
//                                                         backend_to_client
//   custody_proxy_relay_buffer_bytes                      relay buffer memory held now
//                                                         (connections idle 1 s give theirs back)
//   custody_proxy_relay_turns_yielded_total               relay turns ended at the turn limit
//                                                         with bytes left (others went first)
//   custody_proxy_accept_paused_total{reason}             accepting paused: connections, handshakes
//   custody_proxy_config_reloads_total{outcome}           SIGHUP reloads: ok, refused
//   custody_proxy_certificate_not_after_seconds{listener,key}  served leaf certificate expiry
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

namespace custody::proxy {

enum class HandshakeOutcome { kOk, kFailed, kTimeout, kAborted, kCount };
enum class CloseReason { kOk, kBackendError, kClientError, kIdleTimeout, kDrained, kCount };

// ListenerMetrics are one listener's series, made once (workers update them on the hot path).
struct ListenerMetrics {
  prometheus::Counter* handshakes[static_cast<int>(HandshakeOutcome::kCount)] = {};
  prometheus::Histogram* handshake_duration = nullptr;
  prometheus::Gauge* open = nullptr;
  prometheus::Counter* closed[static_cast<int>(CloseReason::kCount)] = {};
  prometheus::Counter* bytes_client_to_backend = nullptr;
  prometheus::Counter* bytes_backend_to_client = nullptr;
};

// SigningSocketMetrics are the signing socket's series, shared by the workers' lanes.
struct SigningSocketMetrics {
  prometheus::Gauge* connected = nullptr;
  prometheus::Counter* sent = nullptr;
  prometheus::Counter* over_grpc = nullptr;
  prometheus::Counter* moved = nullptr;
};

class ProxyMetrics {
 public:
  ProxyMetrics();

  // Serve starts the /metrics endpoint on `listen` (host:port). Returns the bound port.
  [[nodiscard]] absl::StatusOr<uint16_t> Serve(const std::string& listen);

  // ForListener returns the series of listener `name`, making them on first use. Thread-safe;
  // the result lives as long as this object.
  ListenerMetrics* ForListener(const std::string& name);

  // Record* and Set* are thread-safe.
  void RecordSign(const std::string& key, const std::string& scheme, const std::string& code,
                  double seconds);
  void SignStarted() { signs_in_flight_.Increment(); }
  void SignFinished() { signs_in_flight_.Decrement(); }
  void RecordAcceptPaused(bool for_handshakes);
  SigningSocketMetrics* signing_socket() { return &signing_socket_; }
  prometheus::Gauge* relay_buffer_bytes() { return &relay_buffer_bytes_; }
  prometheus::Counter* relay_turns_yielded() { return &relay_turns_yielded_; }
  void RecordReload(bool ok);
  void SetCertificateNotAfter(const std::string& listener, const std::string& key,
                              double unix_seconds);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& handshakes_;
  prometheus::Family<prometheus::Histogram>& handshake_duration_;
  prometheus::Family<prometheus::Histogram>& sign_duration_;
  prometheus::Family<prometheus::Counter>& sign_errors_;
  prometheus::Gauge& signs_in_flight_;
  prometheus::Family<prometheus::Gauge>& open_;
  prometheus::Family<prometheus::Counter>& closed_;
  prometheus::Family<prometheus::Counter>& bytes_;
  prometheus::Gauge& relay_buffer_bytes_;
  prometheus::Counter& relay_turns_yielded_;
  prometheus::Family<prometheus::Counter>& accept_paused_;
  prometheus::Family<prometheus::Counter>& reloads_;
  prometheus::Counter& paused_connections_;
  prometheus::Counter& paused_handshakes_;
  prometheus::Counter& reloads_ok_;
  prometheus::Counter& reloads_refused_;
  prometheus::Family<prometheus::Gauge>& not_after_;
  prometheus::Family<prometheus::Counter>& signing_socket_requests_;
  SigningSocketMetrics signing_socket_;
  MetricsEndpoint endpoint_;

  std::mutex mu_;  // Guards the caches below.
  std::unordered_map<std::string, std::unique_ptr<ListenerMetrics>> listeners_;
  std::unordered_map<std::string, prometheus::Histogram*> sign_series_;
  std::unordered_map<std::string, prometheus::Counter*> sign_error_series_;
};

}  // namespace custody::proxy
