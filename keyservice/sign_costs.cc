#include "keyservice/sign_costs.h"

#include <algorithm>

namespace custody::keyservice {

void SignCosts::Blend(Cost& avg, const Cost& sample) {
  avg.time_us += (sample.time_us - avg.time_us) / 8;
  avg.wait_us += (sample.wait_us - avg.wait_us) / 8;
}

void SignCosts::Record(absl::string_view key, Cost cost) {
  cost.time_us = std::max<int64_t>(cost.time_us, 0);
  cost.wait_us = std::max<int64_t>(cost.wait_us, 0);
  std::lock_guard<std::mutex> lock(mu_);
  Blend(all_, cost);
  auto it = by_key_.find(key);
  if (it == by_key_.end()) {
    if (by_key_.size() >= kMaxKeys) {
      return;
    }
    // A key's first signature is its average so far: a new RSA key is not taken for as quick
    // as the ECDSA keys before it for its first eight signatures.
    by_key_.emplace(std::string(key), cost);
    return;
  }
  Blend(it->second, cost);
}

SignCosts::Cost SignCosts::Of(absl::string_view key) const {
  std::lock_guard<std::mutex> lock(mu_);
  return OfLocked(key);
}

SignCosts::Cost SignCosts::OfLocked(absl::string_view key) const {
  auto it = by_key_.find(key);
  return it != by_key_.end() ? it->second : all_;
}

}  // namespace custody::keyservice
