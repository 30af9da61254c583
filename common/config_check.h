// Checks shared by the config validators of every custody program: field errors that name the
// field, readable and secret files, listen addresses.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace custody {

// ConfigFieldError is INVALID_ARGUMENT "field 'FIELD': WHAT".
absl::Status ConfigFieldError(const std::string& field, const std::string& what);

// RequireReadableFile checks that `path` is set and readable.
[[nodiscard]] absl::Status RequireReadableFile(const std::string& field, const std::string& path);

// RequireSecretFile checks a file holding a secret: readable, and by its owner only.
[[nodiscard]] absl::Status RequireSecretFile(const std::string& field, const std::string& path);

// ValidateListen checks a host:port to listen on; `loopback_only` refuses other hosts.
[[nodiscard]] absl::Status ValidateListen(const std::string& field, const std::string& addr,
                                          bool loopback_only);

// HostPort is a parsed "host:port" or "[v6]:port".
struct HostPort {
  std::string host;
  uint16_t port = 0;
};

// ParseHostPort parses `addr`; port 0 is refused unless `allow_zero_port`.
[[nodiscard]] absl::StatusOr<HostPort> ParseHostPort(const std::string& addr,
                                                     bool allow_zero_port = false);

// IsValidKeyName says whether `name` is a key name: 1 to 128 characters from A-Z a-z 0-9 . _ -
// (so that a name cannot push megabytes or control characters into an audit log, a log or
// metrics).
bool IsValidKeyName(std::string_view name);

// IsLoopbackHost says whether `host` is localhost, 127.0.0.0/8 or ::1.
bool IsLoopbackHost(const std::string& host);

}  // namespace custody
