// Client side of the key service: connection settings (from flags or lab.env variables) and a
// mutual-TLS channel. Used by custodyctl, the benchmarks and the tests.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace custody::keyservice {

struct ClientSettings {
  // host:port of custody-keyd, or several replicas' IP:port separated by commas.
  std::string address;
  std::string ca_file;    // CA bundle that signed the key service's certificate.
  std::string cert_file;  // Client certificate (the caller's identity).
  std::string key_file;   // Its private key (an operator credential, not a served key).
  // Name the key service's certificate must carry; empty: the (first) address' host.
  std::string server_name;
};

// ChannelTarget is a gRPC target made from one address or several replicas.
struct ChannelTarget {
  std::string target;      // "host:port", or "ipv4:a:p,b:q" / "ipv6:[a]:p,[b]:q".
  std::string first_host;  // Host of the first address (the TLS name to check by default).
  bool balanced = false;   // Several replicas: round robin over those that are up.
};

// MakeChannelTarget parses "host:port" or "ip:port,ip:port,...". Several addresses must be IP
// literals of one family (gRPC's ipv4:/ipv6: targets); INVALID_ARGUMENT says so.
[[nodiscard]] absl::StatusOr<ChannelTarget> MakeChannelTarget(const std::string& addresses);

// SettingsForIdentity fills what is empty in `base` from the environment: CUSTODY_KEYD_ADDR,
// CUSTODY_CA, and CUSTODY_<IDENTITY>_CERT / _KEY for `identity` (e.g. "proxy"). INVALID_ARGUMENT
// names the variable or flag still missing.
[[nodiscard]] absl::StatusOr<ClientSettings> SettingsForIdentity(ClientSettings base,
                                                                 const std::string& identity);

// IsUnixSocketAddress says whether `address` is "unix:" and an absolute path (keyd's Unix
// socket, see KeydUnixSocketConfig).
bool IsUnixSocketAddress(const std::string& address);

// MakeChannel opens a mutual-TLS channel to the key service (lazily connected); with several
// replicas, calls go round robin to those that are up. Channels with
// different `connection` numbers use different TCP connections (gRPC otherwise shares one
// connection among channels to the same address), so a client can spread its load.
[[nodiscard]] absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const ClientSettings& settings, int connection = 0);

}  // namespace custody::keyservice
