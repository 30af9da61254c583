#include "keyservice/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/files.h"
#include "common/log.h"
#include "common/signals.h"
#include "common/status.h"
#include "hsm/pkcs11_key_backend.h"
#include "keyservice/audit_log.h"
#include "keyservice/health_service.h"
#include "keyservice/key_service.h"
#include "keyservice/metrics.h"
#include "keyservice/policy.h"
#include "keyservice/sign_workers.h"
#include "keyservice/signing_socket.h"
#include "keyservice/unix_listener.h"

namespace custody::keyservice {
namespace {

constexpr absl::Duration kDrainTimeout = absl::Seconds(5);
// What a request message may carry beyond limits.max_message_bytes: its key name, ids and
// protobuf framing. A little over the limit is refused by the handler (and audited), far over
// it by the transport.
constexpr std::size_t kMessageSlackBytes = 4096;

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const custody::v1::KeydTlsConfig& tls) {
  CUSTODY_ASSIGN_OR_RETURN(std::string cert, ReadFile(tls.cert_file()));
  CUSTODY_ASSIGN_OR_RETURN(std::string key, ReadSecretFile(tls.key_file()));
  CUSTODY_ASSIGN_OR_RETURN(std::string ca, ReadFile(tls.client_ca_file()));
  grpc::SslServerCredentialsOptions opts(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  opts.pem_root_certs = std::move(ca);
  opts.pem_key_cert_pairs.push_back({std::move(key), std::move(cert)});
  return grpc::SslServerCredentials(opts);
}

void PublishCertificateExpiry(const hsm::KeyBackend& backend, KeydMetrics& metrics) {
  for (const hsm::KeyVersionInfo& v : backend.ListKeys()) {
    if (v.not_after != 0) {
      metrics.SetCertificateNotAfter(v.name, v.version, static_cast<double>(v.not_after));
    }
  }
}

}  // namespace

absl::Status RunKeyd(const custody::v1::KeydConfig& config, const KeydOptions& options) {
  CUSTODY_ASSIGN_OR_RETURN(const Policy policy, Policy::Build(config.policy()));
  CUSTODY_ASSIGN_OR_RETURN(std::string pin, ReadSecretFile(config.hsm().pin_file()));
  hsm::Pkcs11Options hsm_options{config.hsm().module(), config.hsm().token_label(), std::move(pin),
                                 config.hsm().sessions()};
  CUSTODY_ASSIGN_OR_RETURN(std::unique_ptr<hsm::Pkcs11KeyBackend> backend,
                           hsm::Pkcs11KeyBackend::Open(hsm_options));
  CUSTODY_ASSIGN_OR_RETURN(std::unique_ptr<AuditLog> audit, AuditLog::Open(config.audit().path()));
  CUSTODY_ASSIGN_OR_RETURN(auto creds, ServerCredentials(config.tls()));

  KeydMetrics metrics;
  metrics.SetSessions(config.hsm().sessions());
  PublishCertificateExpiry(*backend, metrics);
  if (!config.metrics().listen().empty()) {
    CUSTODY_ASSIGN_OR_RETURN(const uint16_t port, metrics.Serve(config.metrics().listen()));
    spdlog::info("metrics: serving /metrics on {} (port {})", config.metrics().listen(), port);
  }

  ServiceLimits limits{absl::Milliseconds(config.limits().sign_timeout_ms()),
                       config.limits().max_message_bytes(), config.hsm().sessions()};
  // With test hooks, signatures go through the fault injector (which does nothing until told).
  FaultInjectingKeyBackend faults(*backend);
  hsm::KeyBackend& signing_backend =
      options.enable_test_hooks ? static_cast<hsm::KeyBackend&>(faults) : *backend;
  KeyServiceImpl key_service(signing_backend, policy, *audit, metrics, limits);
  TestingServiceImpl testing_service(*backend, faults, policy, *audit);

  std::unique_ptr<UnixListener> unix_listener;
  std::unique_ptr<SigningSocket> signing_socket;
  if (config.has_unix_socket()) {
    CUSTODY_ASSIGN_OR_RETURN(unix_listener, UnixListener::Open(config.unix_socket(), *audit));
    SetUnixSocketCaller(config.unix_socket().identity(),
                        absl::StrCat("unix:", config.unix_socket().path()));
    if (!config.unix_socket().signing_path().empty()) {
      CUSTODY_ASSIGN_OR_RETURN(
          signing_socket,
          SigningSocket::Open(config.unix_socket(), key_service, *audit,
                              config.limits().max_message_bytes() + kMessageSlackBytes));
    }
  }

  // Our own health service, not gRPC's built-in one (see health_service.h for why).
  grpc::EnableDefaultHealthCheckService(false);
  HealthService health({"custody.v1.KeyService"});
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config.listen(), creds, &port);
  builder.RegisterService(&key_service);
  builder.RegisterService(&health);
  if (options.enable_test_hooks) {
    spdlog::warn("test hooks are ENABLED (custody.v1.KeyServiceTesting): never in production");
    builder.RegisterService(&testing_service);
  }
  // Sign calls are served by one worker per HSM session (see SignWorkers); the sync pool
  // (GetKey, ListKeys, health) is kept small and steady, since thread churn costs latency.
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> sign_queues;
  for (uint32_t i = 0; i < config.hsm().sessions(); ++i) {
    sign_queues.push_back(builder.AddCompletionQueue());
  }
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 2);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 4);
  grpc::ResourceQuota quota("custody-keyd");
  quota.SetMaxThreads(static_cast<int>(config.hsm().sessions()) + 32);
  builder.SetResourceQuota(quota);
  builder.SetMaxReceiveMessageSize(
      static_cast<int>(config.limits().max_message_bytes() + kMessageSlackBytes));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot listen on ", config.listen(), " (address in use or not local?)"));
  }
  SignWorkers sign_workers(key_service, std::move(sign_queues));
  sign_workers.Start();
  if (unix_listener != nullptr) {
    unix_listener->Start(server.get());
    spdlog::info("unix socket {}: callers are '{}', uids {}", config.unix_socket().path(),
                 config.unix_socket().identity(),
                 config.unix_socket().allowed_uids().empty()
                     ? absl::StrCat(::geteuid(), " (keyd's own)")
                     : absl::StrJoin(config.unix_socket().allowed_uids(), ","));
  }
  if (signing_socket != nullptr) {
    signing_socket->Start();
    spdlog::info("signing socket {}: callers are '{}'", config.unix_socket().signing_path(),
                 config.unix_socket().identity());
  }
  health.SetServing(true);
  spdlog::info(
      "custody-keyd: serving custody.v1.KeyService on {} (port {}), {} HSM sessions, "
      "audit log {}",
      config.listen(), port, config.hsm().sessions(), config.audit().path());

  const sigset_t set = TerminationSignals();
  for (;;) {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) {
      continue;
    }
    if (sig == SIGHUP) {
      spdlog::info("SIGHUP: reading the key inventory again");
      if (absl::Status st = backend->Refresh(); !st.ok()) {
        spdlog::error("inventory refresh failed, keeping the old one: {}", st.ToString());
      }
      PublishCertificateExpiry(*backend, metrics);
      continue;
    }
    spdlog::info("signal {}: draining (up to {})", sig, absl::FormatDuration(kDrainTimeout));
    break;
  }
  if (unix_listener != nullptr) {
    unix_listener->Stop();
  }
  health.Shutdown();
  if (signing_socket != nullptr) {
    // Proxies move to gRPC, which no longer picks this replica (NOT_SERVING).
    signing_socket->Stop();
  }
  sign_workers.Drain();
  server->Shutdown(absl::ToChronoTime(absl::Now() + kDrainTimeout));
  sign_workers.Stop();
  server->Wait();
  spdlog::info("custody-keyd: stopped");
  return absl::OkStatus();
}

}  // namespace custody::keyservice
