// FaultInjectingKeyBackend wraps a KeyBackend and, when told to, makes its signatures slow,
// failing, corrupt or held until released: the failure and asynchrony paths of every client
// driven deterministically against the real service. Installed only with --enable-test-hooks.
#pragma once

#include <condition_variable>
#include <mutex>

#include "custody/v1/testing.pb.h"
#include "hsm/key_backend.h"

namespace custody::keyservice {

class FaultInjectingKeyBackend final : public hsm::KeyBackend {
 public:
  // FaultInjectingKeyBackend forwards to `inner`, which must outlive it.
  explicit FaultInjectingKeyBackend(hsm::KeyBackend& inner) : inner_(inner) {}

  // SetFault applies `fault` to every signature from now on. Thread-safe.
  void SetFault(const custody::v1::Fault& fault);
  // ReleaseHeld lets the held signatures go; returns how many were waiting. Thread-safe.
  uint32_t ReleaseHeld();

  std::vector<hsm::KeyVersionInfo> ListKeys() const override { return inner_.ListKeys(); }
  bool HasKey(const std::string& name) const override { return inner_.HasKey(name); }
  absl::StatusOr<hsm::SignResult> Sign(const std::string& name, uint32_t version,
                                       const hsm::SignInput& input, absl::Time deadline) override;
  absl::Status Refresh() override { return inner_.Refresh(); }
  absl::Status SimulateTokenReset() override { return inner_.SimulateTokenReset(); }

 private:
  hsm::KeyBackend& inner_;
  std::mutex mu_;  // Guards what follows.
  std::condition_variable released_;
  custody::v1::Fault fault_;
  uint64_t release_epoch_ = 0;  // Bumped by ReleaseHeld.
  uint32_t held_ = 0;
};

}  // namespace custody::keyservice
