// MeteredKeySigner wraps a KeySigner and records every asynchronous signature's latency and
// outcome in the proxy's metrics (custody_proxy_sign_duration_seconds, _sign_errors_total).
#pragma once

#include <memory>

#include "proxy/metrics.h"
#include "proxy/provider/key_signer.h"

namespace custody::proxy {

class MeteredKeySigner final : public provider::KeySigner {
 public:
  // `inner` and `metrics` must outlive this object's calls in flight.
  MeteredKeySigner(std::shared_ptr<provider::KeySigner> inner, ProxyMetrics* metrics)
      : inner_(std::move(inner)), metrics_(metrics) {}

  [[nodiscard]] absl::StatusOr<custody::v1::SignResponse> Sign(
      const custody::v1::SignRequest& request, absl::Time deadline) override;
  void SignAsync(const custody::v1::SignRequest& request, absl::Time deadline,
                 SignDone done) override;
  [[nodiscard]] absl::StatusOr<custody::v1::Key> GetKey(const std::string& name,
                                                        absl::Time deadline) override {
    return inner_->GetKey(name, deadline);
  }

 private:
  void Record(const custody::v1::SignRequest& request, const absl::Status& status,
              absl::Time start);

  std::shared_ptr<provider::KeySigner> inner_;
  ProxyMetrics* metrics_;
};

}  // namespace custody::proxy
