// custody-keyd's configuration: loaded strictly from YAML (schema: proto/custody/v1/
// keyd_config.proto), defaults filled in, then checked by named validators whose messages say
// how to fix the file.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "common/config_check.h"
#include "custody/v1/keyd_config.pb.h"

namespace custody::keyservice {

inline constexpr uint32_t kDefaultSessions = 8;
inline constexpr uint32_t kMaxSessions = 256;
inline constexpr uint32_t kDefaultSignTimeoutMs = 2000;
inline constexpr uint32_t kDefaultMaxMessageBytes = 64 * 1024;
inline constexpr uint32_t kMaxMessageBytesLimit = 1024 * 1024;

// LoadKeydConfig reads, defaults and validates the config at `path`. INVALID_ARGUMENT names the
// file, the field and the fix.
[[nodiscard]] absl::StatusOr<custody::v1::KeydConfig> LoadKeydConfig(const std::string& path);

// ValidateKeydConfig fills defaults into `config` and checks it (files are checked to exist).
[[nodiscard]] absl::Status ValidateKeydConfig(custody::v1::KeydConfig& config);

using custody::HostPort;
using custody::IsLoopbackHost;
using custody::ParseHostPort;

}  // namespace custody::keyservice
