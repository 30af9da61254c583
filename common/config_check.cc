#include "common/config_check.h"

#include <arpa/inet.h>
#include <unistd.h>

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"

namespace custody {

absl::Status ConfigFieldError(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("field '", field, "': ", what));
}

absl::Status RequireReadableFile(const std::string& field, const std::string& path) {
  if (path.empty()) {
    return ConfigFieldError(field, "required (a file path)");
  }
  if (::access(path.c_str(), R_OK) != 0) {
    return ConfigFieldError(field, absl::StrCat("cannot read '", path, "'; check the path and its mode"));
  }
  return absl::OkStatus();
}

absl::Status ValidateListen(const std::string& field, const std::string& addr, bool loopback_only) {
  auto hp = ParseHostPort(addr);
  if (!hp.ok()) {
    return ConfigFieldError(field, std::string(hp.status().message()));
  }
  if (loopback_only && !IsLoopbackHost(hp->host)) {
    return ConfigFieldError(field, absl::StrCat("'", addr,
                                       "' is not a loopback address; metrics are served on "
                                       "loopback only unless metrics.allow_non_loopback is true"));
  }
  return absl::OkStatus();
}

absl::Status RequireSecretFile(const std::string& field, const std::string& path) {
  CUSTODY_RETURN_IF_ERROR(RequireReadableFile(field, path));
  if (absl::Status st = ReadSecretFile(path).status(); !st.ok()) {
    return ConfigFieldError(field, std::string(st.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<HostPort> ParseHostPort(const std::string& addr, bool allow_zero_port) {
  std::string host;
  std::string port_str;
  if (!addr.empty() && addr.front() == '[') {
    const auto close = addr.find("]:");
    if (close == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", addr, "' is not host:port (IPv6 is written [::1]:7443)"));
    }
    host = addr.substr(1, close - 1);
    port_str = addr.substr(close + 2);
  } else {
    const auto colon = addr.rfind(':');
    if (colon == std::string::npos || colon == 0 || addr.find(':') != colon) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", addr, "' is not host:port (e.g. 127.0.0.1:7443)"));
    }
    host = addr.substr(0, colon);
    port_str = addr.substr(colon + 1);
  }
  uint32_t port = 0;
  if (!absl::SimpleAtoi(port_str, &port) || port > 65535 || (port == 0 && !allow_zero_port)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", addr, "': port must be a number from 1 to 65535"));
  }
  return HostPort{host, static_cast<uint16_t>(port)};
}

bool IsLoopbackHost(const std::string& host) {
  if (host == "localhost" || host == "::1") {
    return true;
  }
  in_addr a{};
  return ::inet_pton(AF_INET, host.c_str(), &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

bool IsValidKeyName(std::string_view name) {
  return !name.empty() && name.size() <= 128 &&
         std::all_of(name.begin(), name.end(), [](char c) {
           return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
                  c == '-';
         });
}

}  // namespace custody
