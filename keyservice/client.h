// Client side of the key service: connection settings (from flags or lab.env variables) and a
// mutual-TLS channel. Used by custodyctl, the benchmarks and the tests.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace custody::keyservice {

struct ClientSettings {
  std::string address;    // host:port of custody-keyd.
  std::string ca_file;    // CA bundle that signed the key service's certificate.
  std::string cert_file;  // Client certificate (the caller's identity).
  std::string key_file;   // Its private key (an operator credential, not a served key).
};

// SettingsForIdentity fills what is empty in `base` from the environment: CUSTODY_KEYD_ADDR,
// CUSTODY_CA, and CUSTODY_<IDENTITY>_CERT / _KEY for `identity` (e.g. "proxy"). INVALID_ARGUMENT
// names the variable or flag still missing.
[[nodiscard]] absl::StatusOr<ClientSettings> SettingsForIdentity(ClientSettings base,
                                                                 const std::string& identity);

// MakeChannel opens a mutual-TLS channel to the key service (lazily connected). Channels with
// different `connection` numbers use different TCP connections (gRPC otherwise shares one
// connection among channels to the same address), so a client can spread its load.
[[nodiscard]] absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const ClientSettings& settings, int connection = 0);

}  // namespace custody::keyservice
