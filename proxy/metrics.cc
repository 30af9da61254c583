#include "proxy/metrics.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace custody::proxy {
namespace {

prometheus::Family<prometheus::Counter>& Counter(prometheus::Registry& r, const char* name,
                                                 const char* help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r);
}

prometheus::Family<prometheus::Gauge>& Gauge(prometheus::Registry& r, const char* name,
                                             const char* help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r);
}

}  // namespace

ProxyMetrics::ProxyMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      handshakes_(Counter(*registry_, "custody_proxy_handshakes_total",
                          "TLS handshakes by listener and outcome (ok, failed, timeout, "
                          "aborted)")),
      handshake_duration_(prometheus::BuildHistogram()
                              .Name("custody_proxy_handshake_duration_seconds")
                              .Help("Time from accept to a finished TLS handshake")
                              .Register(*registry_)),
      sign_duration_(prometheus::BuildHistogram()
                         .Name("custody_proxy_sign_duration_seconds")
                         .Help("Handshake signatures made by the key service, request to answer")
                         .Register(*registry_)),
      sign_errors_(Counter(*registry_, "custody_proxy_sign_errors_total",
                           "Handshake signatures that failed, by key and status code")),
      signs_in_flight_(Gauge(*registry_, "custody_proxy_signs_in_flight",
                             "Handshake signatures asked of the key service and not yet answered")
                           .Add({})),
      open_(Gauge(*registry_, "custody_proxy_connections_open", "Client connections open now")),
      closed_(Counter(*registry_, "custody_proxy_connections_total",
                      "Closed client connections by listener and how they ended")),
      bytes_(Counter(*registry_, "custody_proxy_bytes_total",
                     "Plaintext bytes relayed, by listener and direction")),
      relay_buffer_bytes_(Gauge(*registry_, "custody_proxy_relay_buffer_bytes",
                                "Relay buffer memory held now; a connection idle for 1 s gives "
                                "its buffers back (OpenSSL's too)")
                              .Add({})),
      relay_turns_yielded_(Counter(*registry_, "custody_proxy_relay_turns_yielded_total",
                                   "Relay turns ended by limits.relay_turn_bytes with bytes "
                                   "still to move (the connection continued after the others)")
                               .Add({})),
      accept_paused_(Counter(*registry_, "custody_proxy_accept_paused_total",
                             "Times a worker stopped accepting at a limit (connections, "
                             "handshakes)")),
      reloads_(Counter(*registry_, "custody_proxy_config_reloads_total",
                       "Configuration reloads (SIGHUP) by outcome (ok, refused)")),
      paused_connections_(accept_paused_.Add({{"reason", "connections"}})),
      paused_handshakes_(accept_paused_.Add({{"reason", "handshakes"}})),
      reloads_ok_(reloads_.Add({{"outcome", "ok"}})),
      reloads_refused_(reloads_.Add({{"outcome", "refused"}})),
      not_after_(Gauge(*registry_, "custody_proxy_certificate_not_after_seconds",
                       "notAfter of each served leaf certificate, Unix seconds")),
      signing_socket_requests_(Counter(
          *registry_, "custody_proxy_signing_socket_requests_total",
          "Handshake signatures by way of keyd's signing socket: sent on it, sent over gRPC "
          "(socket down or full), moved to gRPC after sending (broken, keyd UNAVAILABLE)")) {
  signing_socket_.connected = &Gauge(*registry_, "custody_proxy_signing_socket_connected",
                                     "Workers connected to keyd's signing socket now")
                                   .Add({});
  signing_socket_.sent = &signing_socket_requests_.Add({{"outcome", "sent"}});
  signing_socket_.over_grpc = &signing_socket_requests_.Add({{"outcome", "grpc"}});
  signing_socket_.moved = &signing_socket_requests_.Add({{"outcome", "moved"}});
}

absl::StatusOr<uint16_t> ProxyMetrics::Serve(const std::string& listen) {
  CUSTODY_ASSIGN_OR_RETURN(endpoint_, ServeMetrics(listen, registry_));
  return endpoint_.port;
}

ListenerMetrics* ProxyMetrics::ForListener(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  std::unique_ptr<ListenerMetrics>& m = listeners_[name];
  if (m == nullptr) {
    m = std::make_unique<ListenerMetrics>();
    static const char* const kOutcomes[] = {"ok", "failed", "timeout", "aborted"};
    for (int i = 0; i < static_cast<int>(HandshakeOutcome::kCount); ++i) {
      m->handshakes[i] = &handshakes_.Add({{"listener", name}, {"outcome", kOutcomes[i]}});
    }
    static const char* const kReasons[] = {"ok", "backend_error", "client_error", "idle_timeout",
                                           "drained"};
    for (int i = 0; i < static_cast<int>(CloseReason::kCount); ++i) {
      m->closed[i] = &closed_.Add({{"listener", name}, {"outcome", kReasons[i]}});
    }
    // 1 ms to about 16 s: a handshake waits for one network round trip and one signature.
    m->handshake_duration =
        &handshake_duration_.Add({{"listener", name}}, DoublingBuckets(250e-6, 16.0));
    m->open = &open_.Add({{"listener", name}});
    m->bytes_client_to_backend =
        &bytes_.Add({{"listener", name}, {"direction", "client_to_backend"}});
    m->bytes_backend_to_client =
        &bytes_.Add({{"listener", name}, {"direction", "backend_to_client"}});
  }
  return m.get();
}

void ProxyMetrics::RecordSign(const std::string& key, const std::string& scheme,
                              const std::string& code, double seconds) {
  if (code == "OK") {
    const std::string id = absl::StrCat(key, absl::string_view("\0", 1), scheme);
    prometheus::Histogram* h = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto [it, fresh] = sign_series_.try_emplace(id, nullptr);
      if (fresh) {
        static const auto kBuckets = DoublingBuckets(50e-6, 4.0);
        it->second = &sign_duration_.Add({{"key", key}, {"scheme", scheme}}, kBuckets);
      }
      h = it->second;
    }
    h->Observe(seconds);
    return;
  }
  const std::string id = absl::StrCat(key, absl::string_view("\0", 1), code);
  prometheus::Counter* c = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto [it, fresh] = sign_error_series_.try_emplace(id, nullptr);
    if (fresh) {
      it->second = &sign_errors_.Add({{"key", key}, {"code", code}});
    }
    c = it->second;
  }
  c->Increment();
}

void ProxyMetrics::RecordAcceptPaused(bool for_handshakes) {
  (for_handshakes ? paused_handshakes_ : paused_connections_).Increment();
}

void ProxyMetrics::RecordReload(bool ok) { (ok ? reloads_ok_ : reloads_refused_).Increment(); }

void ProxyMetrics::SetCertificateNotAfter(const std::string& listener, const std::string& key,
                                          double unix_seconds) {
  not_after_.Add({{"listener", listener}, {"key", key}}).Set(unix_seconds);
}

}  // namespace custody::proxy
