#include "keyservice/client.h"

#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
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

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ClientSettings& settings,
                                                           int connection) {
  grpc::SslCredentialsOptions opts;
  CUSTODY_ASSIGN_OR_RETURN(opts.pem_root_certs, ReadFile(settings.ca_file));
  CUSTODY_ASSIGN_OR_RETURN(opts.pem_cert_chain, ReadFile(settings.cert_file));
  CUSTODY_ASSIGN_OR_RETURN(opts.pem_private_key, ReadFile(settings.key_file));
  grpc::ChannelArguments args;
  // Fail fast rather than queue when the key service is down.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  if (connection != 0) {
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("custody.connection", connection);
  }
  return grpc::CreateCustomChannel(settings.address, grpc::SslCredentials(opts), args);
}

}  // namespace custody::keyservice
