#include "keyservice/config.h"

#include <sys/un.h>
#include <unistd.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/config_check.h"
#include "common/files.h"
#include "common/status.h"
#include "common/yaml_proto.h"
#include "keyservice/policy.h"

namespace custody::keyservice {
namespace {

absl::Status ValidateTls(const custody::v1::KeydTlsConfig& tls) {
  CUSTODY_RETURN_IF_ERROR(RequireReadableFile("tls.cert_file", tls.cert_file()));
  CUSTODY_RETURN_IF_ERROR(RequireSecretFile("tls.key_file", tls.key_file()));
  return RequireReadableFile("tls.client_ca_file", tls.client_ca_file());
}

absl::Status ValidateHsm(custody::v1::KeydHsmConfig& hsm) {
  CUSTODY_RETURN_IF_ERROR(RequireReadableFile("hsm.module", hsm.module()));
  if (hsm.token_label().empty()) {
    return ConfigFieldError("hsm.token_label",
                            "required (the label given when the token was initialized)");
  }
  CUSTODY_RETURN_IF_ERROR(RequireSecretFile("hsm.pin_file", hsm.pin_file()));
  if (hsm.sessions() == 0) {
    hsm.set_sessions(kDefaultSessions);
  }
  if (hsm.sessions() > kMaxSessions) {
    return ConfigFieldError("hsm.sessions",
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
    return ConfigFieldError("limits.max_message_bytes",
                            absl::StrCat(limits.max_message_bytes(), " is over the maximum of ",
                                         kMaxMessageBytesLimit));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateKeydConfig(custody::v1::KeydConfig& config) {
  if (config.listen().empty()) {
    return ConfigFieldError("listen", "required, e.g. \"127.0.0.1:7443\"");
  }
  CUSTODY_RETURN_IF_ERROR(ValidateListen("listen", config.listen(), /*loopback_only=*/false));
  if (!config.has_tls()) {
    return ConfigFieldError("tls", "required: the key service serves mutual TLS only");
  }
  CUSTODY_RETURN_IF_ERROR(ValidateTls(config.tls()));
  if (!config.has_hsm()) {
    return ConfigFieldError("hsm", "required (module, token_label, pin_file)");
  }
  CUSTODY_RETURN_IF_ERROR(ValidateHsm(*config.mutable_hsm()));
  if (config.audit().path().empty()) {
    return ConfigFieldError("audit.path", "required: every private-key use is audited");
  }
  {
    const std::string& path = config.audit().path();
    const auto slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
    if (::access(dir.c_str(), W_OK) != 0) {
      return ConfigFieldError("audit.path", absl::StrCat("the folder of '", path,
                                                         "' does not exist or is not writable"));
    }
  }
  if (!config.metrics().listen().empty()) {
    CUSTODY_RETURN_IF_ERROR(ValidateListen("metrics.listen", config.metrics().listen(),
                                           !config.metrics().allow_non_loopback()));
  }
  CUSTODY_RETURN_IF_ERROR(ValidateLimits(*config.mutable_limits()));
  if (config.has_unix_socket()) {
    const custody::v1::KeydUnixSocketConfig& unix_socket = config.unix_socket();
    if (unix_socket.path().empty() || unix_socket.path()[0] != '/') {
      return ConfigFieldError("unix_socket.path",
                              "required: an absolute path, e.g. /run/custody/keyd.sock");
    }
    for (const auto& [field, path] :
         {std::pair{"unix_socket.path", unix_socket.path()},
          std::pair{"unix_socket.signing_path", unix_socket.signing_path()}}) {
      if (path.size() >= sizeof(sockaddr_un{}.sun_path)) {
        return ConfigFieldError(field,
                                absl::StrCat("longer than the ", sizeof(sockaddr_un{}.sun_path) - 1,
                                             " bytes a socket path may have"));
      }
    }
    if (!unix_socket.signing_path().empty() && (unix_socket.signing_path()[0] != '/' ||
                                                unix_socket.signing_path() == unix_socket.path())) {
      return ConfigFieldError("unix_socket.signing_path",
                              "an absolute path other than unix_socket.path, e.g. "
                              "/run/custody/keyd-sign.sock");
    }
    if (unix_socket.identity().empty()) {
      return ConfigFieldError("unix_socket.identity",
                              "required: the policy identity of callers on the socket");
    }
  }
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
