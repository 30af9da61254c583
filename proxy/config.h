// custody-proxy's configuration: loaded strictly from YAML (schema: proto/custody/v1/
// proxy_config.proto), defaults filled in, then checked by named validators whose messages say
// how to fix the file.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "custody/v1/proxy_config.pb.h"

namespace custody::proxy {

inline constexpr uint32_t kMaxWorkers = 256;
inline constexpr uint32_t kDefaultSignTimeoutMs = 2000;
inline constexpr uint32_t kDefaultConnectTimeoutMs = 5000;
inline constexpr uint32_t kDefaultMaxConnections = 10000;
inline constexpr uint32_t kDefaultMaxHandshakes = 256;
inline constexpr uint32_t kDefaultHandshakeTimeoutMs = 10000;
inline constexpr uint32_t kDefaultIdleTimeoutMs = 300000;
inline constexpr uint32_t kDefaultBufferBytes = 16384;
inline constexpr uint32_t kDefaultRelayTurnBytes = 2097152;
inline constexpr uint32_t kDefaultDrainTimeoutMs = 30000;

// LoadProxyConfig reads, defaults and validates the config at `path`. INVALID_ARGUMENT names the
// file, the field and the fix.
[[nodiscard]] absl::StatusOr<custody::v1::ProxyConfig> LoadProxyConfig(const std::string& path);

// ValidateProxyConfig fills defaults into `config` and checks it (files are checked to exist,
// TLS settings are tried on a scratch context).
[[nodiscard]] absl::Status ValidateProxyConfig(custody::v1::ProxyConfig& config);

// BackendAddress is a parsed backend: TCP host:port or a Unix socket path.
struct BackendAddress {
  std::string host;  // Empty for a Unix socket.
  uint16_t port = 0;
  std::string unix_path;
};

// ParseBackendAddress parses "host:port" or "unix:/path".
[[nodiscard]] absl::StatusOr<BackendAddress> ParseBackendAddress(const std::string& address);

// NormalizeServerName lower-cases `name` and checks it is a DNS name, or "*." and a DNS name.
[[nodiscard]] absl::StatusOr<std::string> NormalizeServerName(const std::string& name);

}  // namespace custody::proxy
