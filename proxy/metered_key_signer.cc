#include "proxy/metered_key_signer.h"

#include "absl/status/status.h"
#include "hsm/signature_scheme.h"

namespace custody::proxy {

void MeteredKeySigner::Record(const custody::v1::SignRequest& request, const absl::Status& status,
                              absl::Time start) {
  const auto scheme = hsm::FindScheme(static_cast<uint16_t>(request.scheme()));
  metrics_->RecordSign(request.key_name(), scheme.has_value() ? scheme->name : "unknown",
                       absl::StatusCodeToString(status.code()),
                       absl::ToDoubleSeconds(absl::Now() - start));
}

absl::StatusOr<custody::v1::SignResponse> MeteredKeySigner::Sign(
    const custody::v1::SignRequest& request, absl::Time deadline) {
  const absl::Time start = absl::Now();
  auto result = inner_->Sign(request, deadline);
  Record(request, result.status(), start);
  return result;
}

void MeteredKeySigner::SignAsync(const custody::v1::SignRequest& request, absl::Time deadline,
                                 SignDone done) {
  const absl::Time start = absl::Now();
  // The key name and scheme are copied: the request may be gone when the answer comes.
  custody::v1::SignRequest labels;
  labels.set_key_name(request.key_name());
  labels.set_scheme(request.scheme());
  metrics_->SignStarted();
  inner_->SignAsync(request, deadline,
                    [this, labels = std::move(labels), start,
                     done = std::move(done)](absl::StatusOr<custody::v1::SignResponse> r) {
                      Record(labels, r.status(), start);
                      metrics_->SignFinished();
                      done(std::move(r));
                    });
}

}  // namespace custody::proxy
