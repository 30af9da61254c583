#include "keyservice/config.h"

#include <arpa/inet.h>
#include <unistd.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"
#include "common/yaml_proto.h"
#include "keyservice/policy.h"

namespace custody::keyservice {
namespace {

absl::Status Invalid(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("field '", field, "': ", what));
}

absl::Status RequireReadableFile(const std::string& field, const std::string& path) {
  if (path.empty()) {
    return Invalid(field, "required (a file path)");
  }
  if (::access(path.c_str(), R_OK) != 0) {
    return Invalid(field, absl::StrCat("cannot read '", path, "'; check the path and its mode"));
  }
  return absl::OkStatus();
}

absl::Status ValidateListen(const std::string& field, const std::string& addr, bool loopback_only) {
  auto hp = ParseHostPort(addr);
  if (!hp.ok()) {
    return Invalid(field, std::string(hp.status().message()));
  }
  if (loopback_only && !IsLoopbackHost(hp->host)) {
    return Invalid(field, absl::StrCat("'", addr,
                                       "' is not a loopback address; metrics are served on "
                                       "loopback only unless metrics.allow_non_loopback is true"));
  }
  return absl::OkStatus();
}

// RequireSecretFile checks a file holding a secret: readable, and by its owner only.
absl::Status RequireSecretFile(const std::string& field, const std::string& path) {
  CUSTODY_RETURN_IF_ERROR(RequireReadableFile(field, path));
  if (absl::Status st = ReadSecretFile(path).status(); !st.ok()) {
    return Invalid(field, std::string(st.message()));
  }
  return absl::OkStatus();
}

absl::Status ValidateTls(const custody::v1::KeydTlsConfig& tls) {
  CUSTODY_RETURN_IF_ERROR(RequireReadableFile("tls.cert_file", tls.cert_file()));
  CUSTODY_RETURN_IF_ERROR(RequireSecretFile("tls.key_file", tls.key_file()));
  return RequireReadableFile("tls.client_ca_file", tls.client_ca_file());
}

absl::Status ValidateHsm(custody::v1::KeydHsmConfig& hsm) {
  CUSTODY_RETURN_IF_ERROR(RequireReadableFile("hsm.module", hsm.module()));
  if (hsm.token_label().empty()) {
    return Invalid("hsm.token_label", "required (the label given when the token was initialized)");
  }
  CUSTODY_RETURN_IF_ERROR(RequireSecretFile("hsm.pin_file", hsm.pin_file()));
  if (hsm.sessions() == 0) {
    hsm.set_sessions(kDefaultSessions);
  }
  if (hsm.sessions() > kMaxSessions) {
    return Invalid("hsm.sessions",
                   absl::StrCat(hsm.sessions(), " is over the maximum of ", kMaxSessions));
  }
  return absl::OkStatus();
}

absl::Status ValidateLimits(custody::v1::KeydLimits& limits) {
  if (limits.sign_timeout_ms() == 0) {
    limits.set_sign_timeout_ms(kDefaultSignTimeoutMs);
  }
  if (limits.max_message_bytes() == 0) {
    limits.set_max_message_bytes(kDefaultMaxMessageBytes);
  }
  if (limits.max_message_bytes() > kMaxMessageBytesLimit) {
    return Invalid("limits.max_message_bytes",
                   absl::StrCat(limits.max_message_bytes(), " is over the maximum of ",
                                kMaxMessageBytesLimit));
  }
  return absl::OkStatus();
}

}  // namespace

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

absl::Status ValidateKeydConfig(custody::v1::KeydConfig& config) {
  if (config.listen().empty()) {
    return Invalid("listen", "required, e.g. \"127.0.0.1:7443\"");
  }
  CUSTODY_RETURN_IF_ERROR(ValidateListen("listen", config.listen(), /*loopback_only=*/false));
  if (!config.has_tls()) {
    return Invalid("tls", "required: the key service serves mutual TLS only");
  }
  CUSTODY_RETURN_IF_ERROR(ValidateTls(config.tls()));
  if (!config.has_hsm()) {
    return Invalid("hsm", "required (module, token_label, pin_file)");
  }
  CUSTODY_RETURN_IF_ERROR(ValidateHsm(*config.mutable_hsm()));
  if (config.audit().path().empty()) {
    return Invalid("audit.path", "required: every private-key use is audited");
  }
  {
    const std::string& path = config.audit().path();
    const auto slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
    if (::access(dir.c_str(), W_OK) != 0) {
      return Invalid("audit.path",
                     absl::StrCat("the folder of '", path, "' does not exist or is not writable"));
    }
  }
  if (!config.metrics().listen().empty()) {
    CUSTODY_RETURN_IF_ERROR(ValidateListen("metrics.listen", config.metrics().listen(),
                                           !config.metrics().allow_non_loopback()));
  }
  CUSTODY_RETURN_IF_ERROR(ValidateLimits(*config.mutable_limits()));
  return Policy::Build(config.policy()).status();
}

absl::StatusOr<custody::v1::KeydConfig> LoadKeydConfig(const std::string& path) {
  custody::v1::KeydConfig config;
  CUSTODY_RETURN_IF_ERROR(LoadYamlFileToProto(path, &config));
  if (absl::Status st = ValidateKeydConfig(config); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat(path, ": ", st.message()));
  }
  return config;
}

}  // namespace custody::keyservice
