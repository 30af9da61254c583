#include "common/log.h"

#include <spdlog/sinks/stdout_sinks.h>

#include "absl/strings/str_cat.h"

namespace custody {

absl::Status InitLogging(std::string_view level) {
  const auto lvl = spdlog::level::from_str(std::string(level));
  if (lvl == spdlog::level::off && level != "off") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown log level '", std::string(level),
                     "'; use one of trace, debug, info, warn, error, off"));
  }
  // Not registered by name, so a second call replaces the logger instead of throwing.
  auto logger = std::make_shared<spdlog::logger>("custody",
                                                 std::make_shared<spdlog::sinks::stderr_sink_mt>());
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %^%l%$ %v", spdlog::pattern_time_type::utc);
  logger->set_level(lvl);
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(std::move(logger));
  return absl::OkStatus();
}

}  // namespace custody
