// Logging set-up shared by every binary: spdlog, one line per event, "key=value" fields after
// the message. Never log a PIN, key material or a digest.
#pragma once

#include <spdlog/spdlog.h>

#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

// Debian's Abseil keeps its own string_view (ABSL_OPTION_USE_STD_STRING_VIEW is 0); let fmt
// print it, so a Status message can be logged as is.
template <>
struct fmt::formatter<absl::string_view> : fmt::formatter<std::string_view> {
  auto format(absl::string_view s, fmt::format_context& ctx) const {
    return fmt::formatter<std::string_view>::format(std::string_view(s.data(), s.size()), ctx);
  }
};

namespace custody {

// InitLogging sets the default logger (stderr) and its level: trace, debug, info, warn, error.
// INVALID_ARGUMENT names the accepted levels when `level` is none of them.
[[nodiscard]] absl::Status InitLogging(std::string_view level);

}  // namespace custody
