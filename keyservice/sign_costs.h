// SignCosts: what a signature has recently cost, per key, for the choices made before signing
// (sign on the thread that read the request, or spread a batch over helper threads).
#pragma once

#include <cstdint>
#include <mutex>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"

namespace custody::keyservice {

// SignCosts keeps running averages (1/8 weight) of a successful signature's time in the service
// and of the part of it spent off the CPU (waiting for the HSM), per key. Keys differ a
// hundredfold (ECDSA in a local token against RSA-4096 in a network HSM): one average over all
// of them would sign a mixed load's ECDSA requests the slow way, or its RSA ones the fast way.
// Thread-safe.
class SignCosts {
 public:
  struct Cost {
    int64_t time_us = 0;  // Wall time in the service.
    int64_t wait_us = 0;  // The part of it off the CPU.
    Cost& operator+=(const Cost& o) {
      time_us += o.time_us;
      wait_us += o.wait_us;
      return *this;
    }
  };

  // At most this many keys are tracked one by one; signatures with others count in the average
  // over all keys only.
  static constexpr std::size_t kMaxKeys = 4096;

  // Record adds one successful signature with `key` (negative figures, from a clock stepped
  // back, count as zero).
  void Record(absl::string_view key, Cost cost);
  // Of is `key`'s recent cost; for a key not signed with yet, the average over all keys (zero
  // before the first signature).
  Cost Of(absl::string_view key) const;
  // Sum is the total of Of(key_of(item)) over `items`, under one lock.
  template <typename Items, typename KeyOf>
  Cost Sum(const Items& items, KeyOf key_of) const {
    Cost total;
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& item : items) {
      total += OfLocked(key_of(item));
    }
    return total;
  }

 private:
  static void Blend(Cost& avg, const Cost& sample);
  Cost OfLocked(absl::string_view key) const;  // mu_ held.

  // std::mutex, not absl::Mutex: the system Abseil is not instrumented for ThreadSanitizer.
  mutable std::mutex mu_;  // Guards what follows.
  absl::flat_hash_map<std::string, Cost> by_key_;
  Cost all_;
};

}  // namespace custody::keyservice
