#include "keyservice/client.h"

#include <arpa/inet.h>

#include <cstdlib>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/config_check.h"
#include "common/files.h"
#include "common/status.h"

namespace custody::keyservice {
namespace {

absl::Status FillFromEnv(std::string& field, const std::string& var, const std::string& flag) {
  if (!field.empty()) {
    return absl::OkStatus();
  }
  const char* value = std::getenv(var.c_str());
  if (value == nullptr || *value == '\0') {
    return absl::InvalidArgumentError(absl::StrCat("set ", flag, " or the environment variable ",
                                                   var,
                                                   " (source a lab's lab.env to get them all)"));
  }
  field = value;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ChannelTarget> MakeChannelTarget(const std::string& addresses) {
  std::vector<std::string> parts = absl::StrSplit(addresses, ',', absl::SkipWhitespace());
  if (parts.empty()) {
    return absl::InvalidArgumentError("no key service address (host:port)");
  }
  for (std::string& part : parts) {
    part = std::string(absl::StripAsciiWhitespace(part));
  }
  CUSTODY_ASSIGN_OR_RETURN(HostPort first, ParseHostPort(parts[0]));
  if (parts.size() == 1) {
    return ChannelTarget{parts[0], first.host, false};
  }
  int family = 0;
  std::vector<std::string> uri_parts;
  for (const std::string& part : parts) {
    CUSTODY_ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(part));
    in6_addr a6{};
    in_addr a4{};
    const int f = ::inet_pton(AF_INET, hp.host.c_str(), &a4) == 1    ? AF_INET
                  : ::inet_pton(AF_INET6, hp.host.c_str(), &a6) == 1 ? AF_INET6
                                                                     : 0;
    if (f == 0 || (family != 0 && f != family)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "'", addresses,
          "': several key service addresses must be IP literals of one family (127.0.0.1:7001,"
          "127.0.0.1:7002); for a DNS name that resolves to several replicas give that one name"));
    }
    family = f;
    uri_parts.push_back(f == AF_INET6 ? absl::StrCat("[", hp.host, "]:", hp.port) : part);
  }
  return ChannelTarget{
      absl::StrCat(family == AF_INET6 ? "ipv6:" : "ipv4:", absl::StrJoin(uri_parts, ",")),
      first.host, true};
}

absl::StatusOr<ClientSettings> SettingsForIdentity(ClientSettings base,
                                                   const std::string& identity) {
  const std::string upper = absl::AsciiStrToUpper(identity);
  CUSTODY_RETURN_IF_ERROR(FillFromEnv(base.address, "CUSTODY_KEYD_ADDR", "--addr"));
  CUSTODY_RETURN_IF_ERROR(FillFromEnv(base.ca_file, "CUSTODY_CA", "--ca"));
  CUSTODY_RETURN_IF_ERROR(
      FillFromEnv(base.cert_file, absl::StrCat("CUSTODY_", upper, "_CERT"), "--cert"));
  CUSTODY_RETURN_IF_ERROR(
      FillFromEnv(base.key_file, absl::StrCat("CUSTODY_", upper, "_KEY"), "--key"));
  return base;
}

bool IsUnixSocketAddress(const std::string& address) {
  return absl::StartsWith(address, "unix:/") && address.size() > 6 &&
         address.find(',') == std::string::npos;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ClientSettings& settings,
                                                           int connection) {
  grpc::ChannelArguments args;
  // Fail fast rather than queue when the key service is down.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  if (connection != 0) {
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("custody.connection", connection);
  }
  if (absl::StartsWith(settings.address, "unix:")) {
    if (!IsUnixSocketAddress(settings.address)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "'", settings.address, "': a Unix socket address is unix: and one absolute path"));
    }
    // keyd knows the caller by the uid the kernel reports for this socket's peer: no TLS, no
    // credential files.
    return grpc::CreateCustomChannel(settings.address, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions opts;
  CUSTODY_ASSIGN_OR_RETURN(opts.pem_root_certs, ReadFile(settings.ca_file));
  CUSTODY_ASSIGN_OR_RETURN(opts.pem_cert_chain, ReadFile(settings.cert_file));
  CUSTODY_ASSIGN_OR_RETURN(opts.pem_private_key, ReadFile(settings.key_file));
  CUSTODY_ASSIGN_OR_RETURN(ChannelTarget target, MakeChannelTarget(settings.address));
  if (target.balanced) {
    // Several replicas: gRPC keeps a connection to each and sends every call to one that is up
    // (round robin), so a replica going down costs no failed signature once its connection is
    // seen to drop.
    args.SetLoadBalancingPolicyName("round_robin");
  }
  const std::string& name = settings.server_name.empty() ? target.first_host : settings.server_name;
  if (target.balanced || !settings.server_name.empty()) {
    args.SetSslTargetNameOverride(name);
  }
  return grpc::CreateCustomChannel(target.target, grpc::SslCredentials(opts), args);
}

}  // namespace custody::keyservice
