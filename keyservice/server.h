// RunKeyd: custody-keyd's life: open the HSM, the audit log and the metrics endpoint, serve gRPC
// over mutual TLS, refresh on SIGHUP, drain and stop on SIGTERM/SIGINT.
#pragma once

#include "absl/status/status.h"
#include "custody/v1/keyd_config.pb.h"

namespace custody::keyservice {

struct KeydOptions {
  // Serve custody.v1.KeyServiceTesting (fault injection) to admins. Never in production.
  bool enable_test_hooks = false;
};

// RunKeyd serves until SIGTERM or SIGINT (blocked beforehand: custody::BlockTerminationSignals). Errors at start-up are returned before serving.
[[nodiscard]] absl::Status RunKeyd(const custody::v1::KeydConfig& config,
                                   const KeydOptions& options);

}  // namespace custody::keyservice
