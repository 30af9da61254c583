// RunProxy: custody-proxy's life. Connect to the key service, build every listener's TLS
// contexts (chains fetched from the key service, private halves by reference), bind one socket
// per listener per worker (SO_REUSEPORT), start the workers and the metrics endpoint, then
// reload on SIGHUP and drain on SIGTERM/SIGINT (a second one stops at once).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "custody/v1/proxy_config.pb.h"

namespace custody::proxy {

// BlockProxySignals blocks SIGTERM, SIGINT and SIGHUP in the calling thread and every thread it
// starts afterwards (RunProxy waits for them) and ignores SIGPIPE (a peer that goes away is an
// error code, not a signal). Call first thing in main.
void BlockProxySignals();

// RunProxy serves `config` (read from `config_path`, which SIGHUP reads again) until SIGTERM or
// SIGINT. Errors at start-up are returned before serving.
[[nodiscard]] absl::Status RunProxy(const custody::v1::ProxyConfig& config,
                                    const std::string& config_path);

}  // namespace custody::proxy
