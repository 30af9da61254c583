#include "keyservice/metrics.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace custody::keyservice {

KeydMetrics::KeydMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(prometheus::BuildCounter()
                    .Name("custody_keyd_requests_total")
                    .Help("RPCs answered by the key service, by method and gRPC status code")
                    .Register(*registry_)),
      signatures_(prometheus::BuildCounter()
                      .Name("custody_keyd_signatures_total")
                      .Help("Sign calls by key, signature scheme and outcome")
                      .Register(*registry_)),
      sign_duration_(prometheus::BuildHistogram()
                         .Name("custody_keyd_sign_duration_seconds")
                         .Help("Time from a Sign call's arrival to its answer, for signatures "
                               "made")
                         .Register(*registry_)),
      in_flight_(prometheus::BuildGauge()
                     .Name("custody_keyd_signs_in_flight")
                     .Help("Sign calls being served now")
                     .Register(*registry_)
                     .Add({})),
      sessions_(prometheus::BuildGauge()
                    .Name("custody_keyd_hsm_sessions")
                    .Help("Size of the HSM session pool (signatures in flight at most)")
                    .Register(*registry_)
                    .Add({})),
      not_after_(prometheus::BuildGauge()
                     .Name("custody_keyd_certificate_not_after_seconds")
                     .Help("notAfter of each key version's leaf certificate, Unix seconds")
                     .Register(*registry_)) {}

absl::StatusOr<uint16_t> KeydMetrics::Serve(const std::string& listen) {
  CUSTODY_ASSIGN_OR_RETURN(endpoint_, ServeMetrics(listen, registry_));
  return endpoint_.port;
}

void KeydMetrics::RecordRequest(const std::string& method, const std::string& code) {
  const std::string id = absl::StrCat(method, absl::string_view("\0", 1), code);
  prometheus::Counter* counter = nullptr;
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto [it, fresh] = request_series_.try_emplace(id, nullptr);
    if (fresh) {
      it->second = &requests_.Add({{"method", method}, {"code", code}});
    }
    counter = it->second;
  }
  counter->Increment();
}

void KeydMetrics::RecordSign(const std::string& key, const std::string& scheme,
                             const std::string& code, double seconds) {
  const std::string id =
      absl::StrCat(key, absl::string_view("\0", 1), scheme, absl::string_view("\0", 1), code);
  SignSeries series{};
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto [it, fresh] = sign_series_.try_emplace(id, SignSeries{});
    if (fresh) {
      // 50 us to about 3 s: an HSM signature is tens of microseconds to a few ms.
      static const auto kBuckets = DoublingBuckets(50e-6, 4.0);
      it->second.signatures = &signatures_.Add({{"key", key}, {"scheme", scheme}, {"code", code}});
      it->second.duration = code == "OK"
                                ? &sign_duration_.Add({{"key", key}, {"scheme", scheme}}, kBuckets)
                                : nullptr;
    }
    series = it->second;
  }
  series.signatures->Increment();
  if (series.duration != nullptr) {
    series.duration->Observe(seconds);
  }
}

void KeydMetrics::SetCertificateNotAfter(const std::string& key, uint32_t version,
                                         double unix_seconds) {
  not_after_.Add({{"key", key}, {"version", absl::StrCat(version)}}).Set(unix_seconds);
}

}  // namespace custody::keyservice
