// KeydProcess: a real custody-keyd child process for integration tests. It dies with the test
// process (PR_SET_PDEATHSIG), is stopped (SIGTERM, then SIGKILL) on destruction, and is ready
// when the gRPC health check answers SERVING (polled, never slept for).
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace custody::testing {

class KeydProcess {
 public:
  // Start runs custody-keyd with `args` (e.g. {"--config", path}), its output in `log_path`,
  // and waits up to `ready_timeout` for it to serve.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<KeydProcess>> Start(
      const std::vector<std::string>& args, const std::string& log_path,
      absl::Duration ready_timeout = absl::Seconds(20));
  ~KeydProcess();

  // Stop sends SIGTERM and waits up to `timeout`; returns the exit status (-signal if killed).
  int Stop(absl::Duration timeout = absl::Seconds(10));
  pid_t pid() const { return pid_; }
  std::string Log() const;

 private:
  KeydProcess(pid_t pid, std::string log_path) : pid_(pid), log_path_(std::move(log_path)) {}
  pid_t pid_;
  std::string log_path_;
  bool stopped_ = false;
  int exit_status_ = 0;
};

// WaitForHealthy polls the key service at CUSTODY_KEYD_ADDR (as `identity`) until it answers
// SERVING or `timeout` passes.
[[nodiscard]] absl::Status WaitForHealthy(const std::string& identity, absl::Duration timeout);

}  // namespace custody::testing
