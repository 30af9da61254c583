#include "keyservice/fault_injecting_backend.h"

#include <thread>

#include "absl/strings/str_cat.h"

namespace custody::keyservice {

void FaultInjectingKeyBackend::SetFault(const custody::v1::Fault& fault) {
  std::lock_guard<std::mutex> lock(mu_);
  fault_ = fault;
}

uint32_t FaultInjectingKeyBackend::ReleaseHeld() {
  std::lock_guard<std::mutex> lock(mu_);
  ++release_epoch_;
  released_.notify_all();
  return held_;
}

absl::StatusOr<hsm::SignResult> FaultInjectingKeyBackend::Sign(const std::string& name,
                                                               uint32_t version,
                                                               const hsm::SignInput& input,
                                                               absl::Time deadline) {
  custody::v1::Fault fault;
  {
    std::unique_lock<std::mutex> lock(mu_);
    fault = fault_;
    if (fault.hold()) {
      const uint64_t epoch = release_epoch_;
      ++held_;
      const bool released = released_.wait_until(lock, absl::ToChronoTime(deadline),
                                                 [&] { return release_epoch_ != epoch; });
      --held_;
      if (!released) {
        return absl::DeadlineExceededError("signature held by the test hook until its deadline");
      }
      fault.set_hold(false);
    }
  }
  if (fault.delay_ms() > 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(fault.delay_ms()));
  }
  if (fault.fail_code() != 0) {
    return absl::Status(static_cast<absl::StatusCode>(fault.fail_code()),
                        "failure injected by the test hook");
  }
  absl::StatusOr<hsm::SignResult> result = inner_.Sign(name, version, input, deadline);
  if (result.ok() && fault.corrupt() && !result->signature.empty()) {
    result->signature[result->signature.size() / 2] ^= 0x5a;
  }
  return result;
}

}  // namespace custody::keyservice
