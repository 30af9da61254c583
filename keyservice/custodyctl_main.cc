// custodyctl: the key service from a shell. Every command prints text for people, or JSON with
// --output json for scripts. Exit status: 0 done, 1 the key service refused or failed (the gRPC
// code is printed), 2 bad usage or local trouble.
#include <fcntl.h>
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "common/files.h"
#include "common/unique_fd.h"
#include "custody/v1/key_service.grpc.pb.h"
#include "custody/v1/testing.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "hsm/signature_scheme.h"
#include "keyservice/audit_log.h"
#include "keyservice/client.h"

namespace {

using custody::keyservice::ClientSettings;

struct Globals {
  ClientSettings settings;
  std::string identity;
  std::string output = "text";
  int timeout_ms = 5000;
};

int Fail(const std::string& msg, int code = 2) {
  std::fprintf(stderr, "custodyctl: %s\n", msg.c_str());
  return code;
}

int RpcFail(const grpc::Status& st) {
  static const char* kNames[] = {"OK",
                                 "CANCELLED",
                                 "UNKNOWN",
                                 "INVALID_ARGUMENT",
                                 "DEADLINE_EXCEEDED",
                                 "NOT_FOUND",
                                 "ALREADY_EXISTS",
                                 "PERMISSION_DENIED",
                                 "RESOURCE_EXHAUSTED",
                                 "FAILED_PRECONDITION",
                                 "ABORTED",
                                 "OUT_OF_RANGE",
                                 "UNIMPLEMENTED",
                                 "INTERNAL",
                                 "UNAVAILABLE",
                                 "DATA_LOSS",
                                 "UNAUTHENTICATED"};
  const int code = st.error_code();
  const char* name = code >= 0 && code <= 16 ? kNames[code] : "UNKNOWN";
  return Fail(absl::StrCat(name, ": ", st.error_message()), 1);
}

std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions opts;
  opts.add_whitespace = true;
  opts.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, opts);
  return out;
}

std::unique_ptr<grpc::ClientContext> Context(const Globals& g) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(g.timeout_ms));
  return ctx;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect(const Globals& g) {
  auto settings = custody::keyservice::SettingsForIdentity(g.settings, g.identity);
  if (!settings.ok()) {
    return settings.status();
  }
  return custody::keyservice::MakeChannel(*settings);
}

// WithChannel connects and runs `body` with the channel; a local problem (missing settings,
// unreadable files) exits 2.
template <typename Body>
int WithChannel(const Globals& g, Body body) {
  auto channel = Connect(g);
  if (!channel.ok()) {
    return Fail(std::string(channel.status().message()));
  }
  return body(*channel);
}

std::string SchemeName(int code) {
  auto s = custody::hsm::FindScheme(static_cast<uint16_t>(code));
  return s ? s->name : absl::StrCat(code);
}

void PrintKeyText(const custody::v1::Key& key, bool full) {
  std::printf("%s\t%s\t%u bits\tactive v%u\t%d version(s)\n", key.name().c_str(),
              custody::v1::KeyType_Name(key.type()).c_str(), key.bits(), key.active_version(),
              key.versions_size());
  if (!full) {
    return;
  }
  for (const auto& v : key.versions()) {
    std::vector<std::string> schemes;
    for (int s : v.schemes()) {
      schemes.push_back(SchemeName(s));
    }
    std::printf("\nversion %u (%s)\nschemes: %s\n", v.version(),
                custody::v1::KeyState_Name(v.state()).c_str(),
                absl::StrJoin(schemes, ", ").c_str());
    if (v.certificate_not_after() != 0) {
      std::printf(
          "certificate notAfter: %s\n",
          absl::FormatTime(absl::RFC3339_sec, absl::FromUnixSeconds(v.certificate_not_after()),
                           absl::UTCTimeZone())
              .c_str());
    }
    std::printf("%s%s", v.public_key_pem().c_str(), v.certificate_chain_pem().c_str());
  }
}

int KeysList(const Globals& g, const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = custody::v1::KeyService::NewStub(channel);
  custody::v1::ListKeysResponse resp;
  auto ctx = Context(g);
  grpc::Status st = stub->ListKeys(ctx.get(), {}, &resp);
  if (!st.ok()) {
    return RpcFail(st);
  }
  if (g.output == "json") {
    std::printf("%s", Json(resp).c_str());
    return 0;
  }
  for (const auto& key : resp.keys()) {
    PrintKeyText(key, /*full=*/false);
  }
  return 0;
}

int KeysShow(const Globals& g, const std::shared_ptr<grpc::Channel>& channel,
             const std::string& name) {
  auto stub = custody::v1::KeyService::NewStub(channel);
  custody::v1::GetKeyRequest req;
  req.set_name(name);
  custody::v1::Key key;
  auto ctx = Context(g);
  grpc::Status st = stub->GetKey(ctx.get(), req, &key);
  if (!st.ok()) {
    return RpcFail(st);
  }
  if (g.output == "json") {
    std::printf("%s", Json(key).c_str());
  } else {
    PrintKeyText(key, /*full=*/true);
  }
  return 0;
}

struct SignArgs {
  std::string key;
  std::string scheme;
  std::string in;
  std::string out;
  uint32_t version = 0;
  bool digest = false;
};

int Sign(const Globals& g, const SignArgs& a) {
  const auto scheme = custody::hsm::FindSchemeByName(a.scheme);
  if (!scheme) {
    std::vector<std::string> names;
    for (const auto& s : custody::hsm::AllSchemes()) {
      names.emplace_back(s.name);
    }
    return Fail(
        absl::StrCat("unknown scheme '", a.scheme, "'; use one of ", absl::StrJoin(names, ", ")));
  }
  auto data = custody::ReadFile(a.in);
  if (!data.ok()) {
    return Fail(std::string(data.status().message()));
  }
  if (data->empty()) {
    return Fail(absl::StrCat(a.in, " is empty: nothing to sign"));
  }
  // Open the output before signing: a signature made and audited must not be lost to an
  // unwritable path. A file created here is removed again if signing fails.
  const bool existed = ::access(a.out.c_str(), F_OK) == 0;
  custody::UniqueFd out(::open(a.out.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
  if (!out.valid()) {
    return Fail(absl::StrCat("cannot write ", a.out, ": ", std::strerror(errno)));
  }
  custody::v1::SignRequest req;
  req.set_key_name(a.key);
  req.set_version(a.version);
  req.set_scheme(static_cast<custody::v1::SignatureScheme>(scheme->scheme));
  if (a.digest || scheme->hash == custody::hsm::HashAlg::kNone) {
    // Ed25519 signs the message itself; --digest sends a precomputed digest as is.
    a.digest ? req.set_digest(*data) : req.set_message(*data);
  } else {
    auto digest = custody::hsm::Hash(
        scheme->hash,
        absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(data->data()), data->size()));
    if (!digest.ok()) {
      return Fail(std::string(digest.status().message()));
    }
    req.set_digest(digest->data(), digest->size());
  }
  custody::v1::SignResponse resp;
  grpc::Status st;
  if (int rc = WithChannel(g,
                           [&](const std::shared_ptr<grpc::Channel>& channel) {
                             auto ctx = Context(g);
                             st = custody::v1::KeyService::NewStub(channel)->Sign(ctx.get(), req,
                                                                                  &resp);
                             return 0;
                           });
      rc != 0) {
    if (!existed) {
      ::unlink(a.out.c_str());
    }
    return rc;
  }
  if (!st.ok()) {
    if (!existed) {
      ::unlink(a.out.c_str());
    }
    return RpcFail(st);
  }
  (void)::ftruncate(out.get(), 0);  // Fails harmlessly on a device such as /dev/null.
  const std::string& sig = resp.signature();
  if (::write(out.get(), sig.data(), sig.size()) != static_cast<ssize_t>(sig.size()) ||
      ::close(out.Release()) != 0) {
    return Fail(absl::StrCat("cannot write ", a.out, " (the signature was made: audit id ",
                             resp.request_id(), ")"));
  }
  if (g.output == "json") {
    std::printf("{\"key\":%s,\"version\":%u,\"scheme\":\"%s\",\"request_id\":%s,\"out\":%s}\n",
                custody::keyservice::JsonQuote(a.key).c_str(), resp.version(), scheme->name,
                custody::keyservice::JsonQuote(resp.request_id()).c_str(),
                custody::keyservice::JsonQuote(a.out).c_str());
  } else {
    std::printf("signed with %s v%u (%s): %zu bytes to %s; audit id %s\n", a.key.c_str(),
                resp.version(), scheme->name, resp.signature().size(), a.out.c_str(),
                resp.request_id().c_str());
  }
  return 0;
}

int Health(const Globals& g, const std::shared_ptr<grpc::Channel>& channel,
           const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  auto ctx = Context(g);
  grpc::Status st = stub->Check(ctx.get(), req, &resp);
  if (!st.ok()) {
    return RpcFail(st);
  }
  const std::string status =
      grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status());
  if (g.output == "json") {
    std::printf("{\"status\":\"%s\"}\n", status.c_str());
  } else {
    std::printf("%s\n", status.c_str());
  }
  return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

int AuditVerify(const Globals& g, const std::string& path) {
  auto summary = custody::keyservice::VerifyAuditLog(path);
  if (!summary.ok()) {
    return Fail(std::string(summary.status().message()), 1);
  }
  if (g.output == "json") {
    std::printf("{\"records\":%llu,\"ok\":true}\n",
                static_cast<unsigned long long>(summary->records));
  } else {
    std::printf("%s: %llu records, hash chain intact\n", path.c_str(),
                static_cast<unsigned long long>(summary->records));
  }
  return 0;
}

int CloseSessions(const Globals& g, const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = custody::v1::KeyServiceTesting::NewStub(channel);
  custody::v1::CloseAllSessionsResponse resp;
  auto ctx = Context(g);
  grpc::Status st = stub->CloseAllSessions(ctx.get(), {}, &resp);
  if (!st.ok()) {
    return RpcFail(st);
  }
  std::printf("closed every HSM session of the key service\n");
  return 0;
}

int SetFault(const Globals& g, const std::shared_ptr<grpc::Channel>& channel,
             const custody::v1::Fault& fault) {
  auto stub = custody::v1::KeyServiceTesting::NewStub(channel);
  custody::v1::SetFaultRequest req;
  *req.mutable_fault() = fault;
  custody::v1::SetFaultResponse resp;
  auto ctx = Context(g);
  grpc::Status st = stub->SetFault(ctx.get(), req, &resp);
  if (!st.ok()) {
    return RpcFail(st);
  }
  std::printf("fault set: %s\n", fault.ShortDebugString().c_str());
  return 0;
}

int ReleaseHeld(const Globals& g, const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = custody::v1::KeyServiceTesting::NewStub(channel);
  custody::v1::ReleaseHeldResponse resp;
  auto ctx = Context(g);
  grpc::Status st = stub->ReleaseHeld(ctx.get(), {}, &resp);
  if (!st.ok()) {
    return RpcFail(st);
  }
  std::printf("released %u held signature(s)\n", resp.released());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "custodyctl: talk to custody-keyd (connection settings default to lab.env "
      "variables: CUSTODY_KEYD_ADDR, CUSTODY_CA, CUSTODY_<IDENTITY>_CERT/_KEY)"};
  app.require_subcommand(1);
  Globals g;
  const char* env_identity = std::getenv("CUSTODY_IDENTITY");
  g.identity = env_identity != nullptr && *env_identity != '\0' ? env_identity : "admin";
  app.add_option("--addr", g.settings.address, "key service host:port [CUSTODY_KEYD_ADDR]");
  app.add_option("--ca", g.settings.ca_file, "CA bundle of the key service [CUSTODY_CA]");
  app.add_option("--cert", g.settings.cert_file, "client certificate [CUSTODY_<ID>_CERT]");
  app.add_option("--key", g.settings.key_file, "client key [CUSTODY_<ID>_KEY]");
  app.add_option("--identity", g.identity,
                 "identity whose lab.env credentials to use: proxy, admin, intruder "
                 "[CUSTODY_IDENTITY, else admin]");
  app.add_option("-o,--output", g.output, "text or json")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.add_option("--timeout-ms", g.timeout_ms, "deadline of each call")->capture_default_str();

  int rc = 0;
  auto* keys = app.add_subcommand("keys", "list and show keys")->require_subcommand(1);
  keys->add_subcommand("list", "keys this identity may read")->callback([&] {
    rc = WithChannel(g, [&](const auto& ch) { return KeysList(g, ch); });
  });
  std::string show_name;
  auto* show = keys->add_subcommand("show", "a key's versions, public key and chain (PEM)");
  show->add_option("name", show_name, "key name")->required();
  show->callback(
      [&] { rc = WithChannel(g, [&](const auto& ch) { return KeysShow(g, ch, show_name); }); });

  SignArgs sa;
  auto* sign = app.add_subcommand("sign", "sign a file's content inside the HSM");
  sign->add_option("--key", sa.key, "key name")->required();
  sign->add_option("--scheme", sa.scheme, "TLS scheme, e.g. ecdsa_secp256r1_sha256")->required();
  sign->add_option("--in", sa.in, "file to sign (hashed here unless --digest)")->required();
  sign->add_option("--out", sa.out, "where to write the signature (DER for ECDSA)")->required();
  sign->add_option("--version", sa.version, "key version (default: the active one)");
  sign->add_flag("--digest", sa.digest, "--in holds a digest already, sent as is");
  sign->callback([&] { rc = Sign(g, sa); });

  std::string service;
  auto* health = app.add_subcommand("health", "is the key service serving? (exit 0 if so)");
  health->add_option("--service", service, "service name (default: the whole server)");
  health->callback(
      [&] { rc = WithChannel(g, [&](const auto& ch) { return Health(g, ch, service); }); });

  std::string audit_path;
  auto* audit = app.add_subcommand("audit", "audit log tools")->require_subcommand(1);
  auto* verify = audit->add_subcommand("verify", "check an audit log's hash chain (offline)");
  verify->add_option("path", audit_path, "audit log [CUSTODY_AUDIT_LOG]");
  verify->callback([&] {
    if (audit_path.empty() && std::getenv("CUSTODY_AUDIT_LOG") != nullptr) {
      audit_path = std::getenv("CUSTODY_AUDIT_LOG");
    }
    rc = audit_path.empty() ? Fail("give the audit log path") : AuditVerify(g, audit_path);
  });

  auto* testing =
      app.add_subcommand("testing", "test hooks (keyd --enable-test-hooks)")->require_subcommand(1);
  testing->add_subcommand("close-sessions", "close every HSM session under the key service")
      ->callback(
          [&] { rc = WithChannel(g, [&](const auto& ch) { return CloseSessions(g, ch); }); });

  custody::v1::Fault fault;
  uint32_t delay_ms = 0;
  int32_t fail_code = 0;
  bool corrupt = false;
  bool hold = false;
  auto* set_fault = testing->add_subcommand(
      "set-fault", "make every following signature slow, failing, corrupt or held");
  set_fault->add_option("--delay-ms", delay_ms, "wait before signing");
  set_fault->add_option("--fail-code", fail_code, "fail with this gRPC code (14: UNAVAILABLE)");
  set_fault->add_flag("--corrupt", corrupt, "flip a byte of every signature");
  set_fault->add_flag("--hold", hold, "hold signatures until release-held");
  set_fault->callback([&] {
    fault.set_delay_ms(delay_ms);
    fault.set_fail_code(fail_code);
    fault.set_corrupt(corrupt);
    fault.set_hold(hold);
    rc = WithChannel(g, [&](const auto& ch) { return SetFault(g, ch, fault); });
  });
  testing->add_subcommand("release-held", "let held signatures go")->callback([&] {
    rc = WithChannel(g, [&](const auto& ch) { return ReleaseHeld(g, ch); });
  });

  CLI11_PARSE(app, argc, argv);
  return rc;
}
