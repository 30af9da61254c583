#include "proxy/config.h"

#include <sys/un.h>

#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/config_check.h"
#include "common/status.h"
#include "common/yaml_proto.h"
#include "keyservice/client.h"
#include "proxy/proxy_protocol.h"
#include "proxy/tls_context.h"

namespace custody::proxy {
namespace {

using custody::v1::ProxyConfig;

// ValidateTcpKeyService checks host:port replicas and the mutual-TLS files.
absl::Status ValidateTcpKeyService(const custody::v1::ProxyKeyServiceConfig& ks) {
  std::string joined;
  for (int i = 0; i < ks.addresses_size(); ++i) {
    const std::string field = absl::StrCat("key_service.addresses[", i, "]");
    auto hp = ParseHostPort(ks.addresses(i));
    if (!hp.ok()) {
      return ConfigFieldError(field, std::string(hp.status().message()));
    }
    absl::StrAppend(&joined, i == 0 ? "" : ",", ks.addresses(i));
  }
  if (auto target = keyservice::MakeChannelTarget(joined); !target.ok()) {
    return ConfigFieldError("key_service.addresses", std::string(target.status().message()));
  }
  CUSTODY_RETURN_IF_ERROR(RequireReadableFile("key_service.ca_file", ks.ca_file()));
  CUSTODY_RETURN_IF_ERROR(RequireReadableFile("key_service.cert_file", ks.cert_file()));
  return RequireSecretFile("key_service.key_file", ks.key_file());
}

absl::Status ValidateKeyService(custody::v1::ProxyKeyServiceConfig& ks) {
  if (ks.addresses().empty()) {
    return ConfigFieldError("key_service.addresses",
                            "required: at least one custody-keyd address (host:port)");
  }
  for (int i = 0; i < ks.addresses_size(); ++i) {
    if (absl::StartsWith(ks.addresses(i), "unix:") && ks.addresses_size() > 1) {
      return ConfigFieldError(absl::StrCat("key_service.addresses[", i, "]"),
                              "a Unix socket must be the only address");
    }
  }
  if (!absl::StartsWith(ks.addresses(0), "unix:")) {
    CUSTODY_RETURN_IF_ERROR(ValidateTcpKeyService(ks));
  } else if (!keyservice::IsUnixSocketAddress(ks.addresses(0))) {
    return ConfigFieldError("key_service.addresses[0]",
                            "a Unix socket address is unix: and an absolute path, e.g. "
                            "\"unix:/run/custody/keyd.sock\"");
  }
  if (!ks.signing_socket().empty() &&
      (!keyservice::IsUnixSocketAddress(absl::StrCat("unix:", ks.signing_socket())) ||
       ks.signing_socket().size() >= sizeof(sockaddr_un{}.sun_path))) {
    return ConfigFieldError("key_service.signing_socket",
                            "an absolute path of at most 107 bytes (keyd's "
                            "unix_socket.signing_path), e.g. /run/custody/keyd-sign.sock");
  }
  if (ks.sign_timeout_ms() == 0) {
    ks.set_sign_timeout_ms(kDefaultSignTimeoutMs);
  }
  if (ks.sign_timeout_ms() > 60000) {
    return ConfigFieldError("key_service.sign_timeout_ms",
                            "at most 60000 (a handshake waits this long for its signature)");
  }
  return absl::OkStatus();
}

absl::Status ValidateCertificates(const std::string& prefix,
                                  custody::v1::ProxyListenerConfig& listener) {
  if (listener.certificates().empty()) {
    return ConfigFieldError(absl::StrCat(prefix, ".certificates"),
                            "required: at least one certificate (key: NAME of a key-service key)");
  }
  std::set<std::string> names;
  int defaults = 0;
  for (int i = 0; i < listener.certificates_size(); ++i) {
    custody::v1::ProxyCertificate& cert = *listener.mutable_certificates(i);
    const std::string field = absl::StrCat(prefix, ".certificates[", i, "]");
    if (!IsValidKeyName(cert.key())) {
      return ConfigFieldError(absl::StrCat(field, ".key"),
                              cert.key().empty()
                                  ? "required: the key-service name of the key (e.g. lab-ec256)"
                                  : "a key name is 1 to 128 characters from A-Z a-z 0-9 . _ -");
    }
    if (!cert.chain_file().empty()) {
      CUSTODY_RETURN_IF_ERROR(
          RequireReadableFile(absl::StrCat(field, ".chain_file"), cert.chain_file()));
    }
    for (int j = 0; j < cert.server_names_size(); ++j) {
      const std::string name_field = absl::StrCat(field, ".server_names[", j, "]");
      auto name = NormalizeServerName(cert.server_names(j));
      if (!name.ok()) {
        return ConfigFieldError(name_field, std::string(name.status().message()));
      }
      if (!names.insert(*name).second) {
        return ConfigFieldError(name_field, absl::StrCat("'", *name,
                                                         "' is already served by another "
                                                         "certificate of this listener"));
      }
      cert.set_server_names(j, *name);
    }
    defaults += cert.default_() ? 1 : 0;
  }
  if (defaults > 1) {
    return ConfigFieldError(absl::StrCat(prefix, ".certificates"),
                            "more than one certificate says default: true; keep one");
  }
  if (defaults == 0) {
    listener.mutable_certificates(0)->set_default_(true);
  }
  return absl::OkStatus();
}

absl::Status ValidateBackend(const std::string& prefix, custody::v1::ProxyBackendConfig& backend) {
  if (backend.address().empty()) {
    return ConfigFieldError(absl::StrCat(prefix, ".backend.address"),
                            "required: where plaintext goes, host:port or unix:/path");
  }
  if (auto addr = ParseBackendAddress(backend.address()); !addr.ok()) {
    return ConfigFieldError(absl::StrCat(prefix, ".backend.address"),
                            std::string(addr.status().message()));
  }
  if (backend.connect_timeout_ms() == 0) {
    backend.set_connect_timeout_ms(kDefaultConnectTimeoutMs);
  }
  if (!ParseProxyProtocol(backend.proxy_protocol()).has_value()) {
    return ConfigFieldError(absl::StrCat(prefix, ".backend.proxy_protocol"),
                            absl::StrCat("'", backend.proxy_protocol(), "' is not v1, v2 or off"));
  }
  return absl::OkStatus();
}

absl::Status ValidateListeners(ProxyConfig& config) {
  if (config.listeners().empty()) {
    return ConfigFieldError("listeners", "required: at least one listener");
  }
  std::set<std::string> names;
  std::set<std::string> addresses;
  for (int i = 0; i < config.listeners_size(); ++i) {
    custody::v1::ProxyListenerConfig& listener = *config.mutable_listeners(i);
    const std::string prefix = absl::StrCat("listeners[", i, "]");
    if (listener.name().empty()) {
      listener.set_name(absl::StrCat("listener", i));
    }
    if (!IsValidKeyName(listener.name())) {
      return ConfigFieldError(absl::StrCat(prefix, ".name"),
                              "1 to 128 characters from A-Z a-z 0-9 . _ -");
    }
    if (!names.insert(listener.name()).second) {
      return ConfigFieldError(absl::StrCat(prefix, ".name"),
                              absl::StrCat("'", listener.name(), "' names two listeners"));
    }
    CUSTODY_RETURN_IF_ERROR(
        ValidateListen(absl::StrCat(prefix, ".listen"), listener.listen(), false));
    if (!addresses.insert(listener.listen()).second) {
      return ConfigFieldError(absl::StrCat(prefix, ".listen"),
                              absl::StrCat("'", listener.listen(), "' is used by two listeners"));
    }
    CUSTODY_RETURN_IF_ERROR(ValidateCertificates(prefix, listener));
    CUSTODY_RETURN_IF_ERROR(
        CheckTlsSettings(absl::StrCat(prefix, ".tls"), *listener.mutable_tls()));
    CUSTODY_RETURN_IF_ERROR(ValidateBackend(prefix, *listener.mutable_backend()));
  }
  return absl::OkStatus();
}

// Bounded returns `value`, or `def` when it is 0, after checking it lies in [lo, hi].
absl::StatusOr<uint32_t> Bounded(const std::string& field, uint32_t value, uint32_t def,
                                 uint32_t lo, uint32_t hi, const std::string& unit) {
  if (value == 0) {
    value = def;
  }
  if (value < lo || value > hi) {
    return ConfigFieldError(
        field, absl::StrCat("must be from ", lo, " to ", hi, " ", unit, " (default ", def, ")"));
  }
  return value;
}

#define CUSTODY_LIMIT(field, def, lo, hi, unit)                                                    \
  do {                                                                                             \
    CUSTODY_ASSIGN_OR_RETURN(uint32_t v, Bounded("limits." #field, l.field(), def, lo, hi, unit)); \
    l.set_##field(v);                                                                              \
  } while (0)

absl::Status ValidateLimits(custody::v1::ProxyLimits& l) {
  CUSTODY_LIMIT(max_connections, kDefaultMaxConnections, 1, 1000000, "connections");
  CUSTODY_LIMIT(max_handshakes, kDefaultMaxHandshakes, 1, 65536, "handshakes");
  CUSTODY_LIMIT(handshake_timeout_ms, kDefaultHandshakeTimeoutMs, 100, 600000, "ms");
  CUSTODY_LIMIT(idle_timeout_ms, kDefaultIdleTimeoutMs, 100, 86400000, "ms");
  CUSTODY_LIMIT(buffer_bytes, kDefaultBufferBytes, 4096, 1048576, "bytes");
  CUSTODY_LIMIT(drain_timeout_ms, kDefaultDrainTimeoutMs, 1, 3600000, "ms");
  CUSTODY_LIMIT(relay_turn_bytes, kDefaultRelayTurnBytes, 4096, 67108864, "bytes");
  if (l.max_handshakes() > l.max_connections()) {
    l.set_max_handshakes(l.max_connections());
  }
  return absl::OkStatus();
}

#undef CUSTODY_LIMIT

}  // namespace

absl::StatusOr<BackendAddress> ParseBackendAddress(const std::string& address) {
  BackendAddress out;
  if (absl::StartsWith(address, "unix:")) {
    out.unix_path = address.substr(5);
    if (out.unix_path.empty() || out.unix_path.front() != '/') {
      return absl::InvalidArgumentError(
          absl::StrCat("'", address, "': a Unix socket is written unix:/absolute/path"));
    }
    if (out.unix_path.size() >= 108) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", address, "': a Unix socket path must be shorter than 108 bytes"));
    }
    return out;
  }
  CUSTODY_ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(address));
  out.host = hp.host;
  out.port = hp.port;
  return out;
}

absl::StatusOr<std::string> NormalizeServerName(const std::string& name) {
  std::string lower = absl::AsciiStrToLower(name);
  std::string_view rest = lower;
  if (rest.substr(0, 2) == "*.") {
    rest.remove_prefix(2);
  }
  bool ok = !rest.empty() && rest.size() <= 253 && rest.front() != '.' && rest.back() != '.' &&
            rest.find("..") == std::string_view::npos;
  size_t label = 0;
  for (char c : rest) {
    if (c == '.') {
      label = 0;
      continue;
    }
    ok = ok && (absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-') && ++label <= 63;
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", name,
                     "' is not a DNS name (letters, digits, '-', dots; a wildcard only as a "
                     "leading '*.')"));
  }
  return lower;
}

absl::Status ValidateProxyConfig(ProxyConfig& config) {
  if (config.workers() > kMaxWorkers) {
    return ConfigFieldError("workers",
                            absl::StrCat("at most ", kMaxWorkers, "; 0 means one per CPU"));
  }
  CUSTODY_RETURN_IF_ERROR(ValidateKeyService(*config.mutable_key_service()));
  CUSTODY_RETURN_IF_ERROR(ValidateListeners(config));
  CUSTODY_RETURN_IF_ERROR(ValidateLimits(*config.mutable_limits()));
  if (!config.metrics().listen().empty()) {
    CUSTODY_RETURN_IF_ERROR(ValidateListen("metrics.listen", config.metrics().listen(),
                                           !config.metrics().allow_non_loopback()));
  }
  return absl::OkStatus();
}

absl::StatusOr<ProxyConfig> LoadProxyConfig(const std::string& path) {
  ProxyConfig config;
  CUSTODY_RETURN_IF_ERROR(LoadYamlFileToProto(path, &config));
  if (absl::Status st = ValidateProxyConfig(config); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat(path, ": ", st.message()));
  }
  return config;
}

}  // namespace custody::proxy
