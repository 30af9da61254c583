#include "proxy/server.h"

#include <netdb.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/config_check.h"
#include "common/log.h"
#include "common/signals.h"
#include "common/status.h"
#include "google/protobuf/util/message_differencer.h"
#include "keyservice/client.h"
#include "proxy/config.h"
#include "proxy/metered_key_signer.h"
#include "proxy/metrics.h"
#include "proxy/provider/provider.h"
#include "proxy/worker.h"

namespace custody::proxy {
namespace {

// kChainFetchTimeout bounds reading a certificate chain from the key service (at least).
constexpr absl::Duration kChainFetchTimeout = absl::Seconds(10);

using custody::v1::ProxyConfig;

absl::Status ErrnoStatus(const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

uint32_t CpuCount() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) {
    return static_cast<uint32_t>(CPU_COUNT(&set));
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// ResolveBackend turns the backend's address into a sockaddr (numeric hosts or DNS, first
// answer; a reload resolves again).
absl::Status ResolveBackend(const std::string& name, ListenerRuntime& rt) {
  if (!rt.backend.unix_path.empty()) {
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, rt.backend.unix_path.c_str(), rt.backend.unix_path.size() + 1);
    std::memcpy(&rt.backend_addr, &un, sizeof(un));
    rt.backend_addr_len = sizeof(un);
    return absl::OkStatus();
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port = absl::StrCat(rt.backend.port);
  if (int e = getaddrinfo(rt.backend.host.c_str(), port.c_str(), &hints, &res); e != 0) {
    return absl::UnavailableError(absl::StrCat("listener '", name, "': backend host '",
                                               rt.backend.host, "': ", gai_strerror(e)));
  }
  std::memcpy(&rt.backend_addr, res->ai_addr, res->ai_addrlen);
  rt.backend_addr_len = res->ai_addrlen;
  freeaddrinfo(res);
  return absl::OkStatus();
}

absl::StatusOr<UniqueFd> Listen(const std::string& addr) {
  CUSTODY_ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(addr));
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port = absl::StrCat(hp.port);
  if (int e = getaddrinfo(hp.host.c_str(), port.c_str(), &hints, &res); e != 0) {
    return absl::InvalidArgumentError(absl::StrCat("listen address ", addr, ": ", gai_strerror(e)));
  }
  UniqueFd fd(::socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  const int one = 1;
  const bool ok =
      fd.valid() && ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0 &&
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) == 0 &&
      ::bind(fd.get(), res->ai_addr, res->ai_addrlen) == 0 && ::listen(fd.get(), SOMAXCONN) == 0;
  freeaddrinfo(res);
  if (!ok) {
    return ErrnoStatus(absl::StrCat("cannot listen on ", addr));
  }
  return fd;
}

class ProxyServer {
 public:
  explicit ProxyServer(std::string config_path) : config_path_(std::move(config_path)) {}

  ~ProxyServer() {
    for (auto& w : workers_) {
      w->Drain(0);
    }
    for (auto& t : threads_) {
      if (t.joinable()) {
        t.join();
      }
    }
  }

  absl::Status Start(const ProxyConfig& config) {
    config_ = config;
    keyservice::ClientSettings settings;
    settings.address = absl::StrJoin(config.key_service().addresses(), ",");
    settings.ca_file = config.key_service().ca_file();
    settings.cert_file = config.key_service().cert_file();
    settings.key_file = config.key_service().key_file();
    settings.server_name = config.key_service().server_name();
    CUSTODY_ASSIGN_OR_RETURN(auto channel, keyservice::MakeChannel(settings));
    const absl::Duration timeout = absl::Milliseconds(config.key_service().sign_timeout_ms());
    signer_ = std::make_shared<MeteredKeySigner>(provider::MakeGrpcKeySigner(channel, timeout),
                                                 &metrics_);
    libctx_.reset(OSSL_LIB_CTX_new());
    if (libctx_ == nullptr) {
      return absl::InternalError("OSSL_LIB_CTX_new failed");
    }
    CUSTODY_ASSIGN_OR_RETURN(providers_, provider::LoadBuiltin(libctx_.get(), signer_, timeout));
    CUSTODY_ASSIGN_OR_RETURN(state_, BuildState(config, 1));

    if (!config.metrics().listen().empty()) {
      CUSTODY_ASSIGN_OR_RETURN(uint16_t port, metrics_.Serve(config.metrics().listen()));
      spdlog::info("metrics on {} (port {})", config.metrics().listen(), port);
    }
    const uint32_t workers = config.workers() != 0 ? config.workers() : CpuCount();
    for (uint32_t w = 0; w < workers; ++w) {
      std::vector<UniqueFd> fds;
      for (const auto& listener : config.listeners()) {
        auto fd = Listen(listener.listen());
        if (!fd.ok()) {
          return absl::Status(fd.status().code(), absl::StrCat("listener '", listener.name(),
                                                               "': ", fd.status().message()));
        }
        fds.push_back(*std::move(fd));
      }
      auto worker = std::make_unique<Worker>(static_cast<int>(w), std::move(fds), state_, &metrics_,
                                             config.key_service().signing_socket());
      CUSTODY_RETURN_IF_ERROR(worker->Init());
      workers_.push_back(std::move(worker));
    }
    for (auto& worker : workers_) {
      running_.fetch_add(1);
      threads_.emplace_back([w = worker.get(), this] {
        w->Run();
        running_.fetch_sub(1);
      });
    }
    for (const auto& l : config.listeners()) {
      spdlog::info("listener '{}' on {}: {} certificate(s), backend {}", l.name(), l.listen(),
                   l.certificates_size(), l.backend().address());
    }
    spdlog::info("custody-proxy ready: {} worker(s), key service {}", workers, settings.address);
    return absl::OkStatus();
  }

  // Serve waits for signals: SIGHUP reloads, SIGTERM/SIGINT drain (twice: stop now).
  void Serve() {
    const sigset_t set = TerminationSignals();
    bool draining = false;
    for (;;) {
      if (draining && running_.load() == 0) {
        break;
      }
      timespec tick{0, 100 * 1000 * 1000};
      const int sig = draining ? sigtimedwait(&set, nullptr, &tick) : sigwaitinfo(&set, nullptr);
      if (sig < 0) {
        continue;  // Timeout or EINTR.
      }
      if (sig == SIGHUP) {
        if (!draining) {
          Reload();
        }
        continue;
      }
      const int64_t deadline = draining ? 0 : NowMs() + config_.limits().drain_timeout_ms();
      spdlog::info("{}: {}", strsignal(sig),
                   draining ? "closing every connection now"
                            : absl::StrCat("draining (at most ",
                                           config_.limits().drain_timeout_ms(), " ms)"));
      draining = true;
      for (auto& w : workers_) {
        w->Drain(deadline);
      }
    }
    for (auto& t : threads_) {
      t.join();
    }
    spdlog::info("custody-proxy stopped");
  }

 private:
  absl::StatusOr<std::shared_ptr<const ProxyState>> BuildState(const ProxyConfig& config,
                                                               uint64_t generation) {
    auto state = std::make_shared<ProxyState>();
    state->limits = config.limits();
    state->generation = generation;
    // Chains are read at start and on reload, off the handshake path: the first read also waits
    // for the connection to keyd, so it gets more than a signature's deadline.
    const absl::Duration timeout =
        std::max(kChainFetchTimeout, absl::Milliseconds(config.key_service().sign_timeout_ms()));
    for (const auto& listener : config.listeners()) {
      ListenerRuntime rt;
      rt.name = listener.name();
      CUSTODY_ASSIGN_OR_RETURN(rt.tls,
                               ListenerTls::Build(listener, libctx_.get(), *signer_, timeout));
      rt.backend_address = listener.backend().address();
      CUSTODY_ASSIGN_OR_RETURN(rt.backend, ParseBackendAddress(rt.backend_address));
      CUSTODY_RETURN_IF_ERROR(ResolveBackend(listener.name(), rt));
      rt.connect_timeout_ms = listener.backend().connect_timeout_ms();
      rt.proxy_protocol =
          ParseProxyProtocol(listener.backend().proxy_protocol()).value_or(ProxyProtocol::kOff);
      rt.metrics = metrics_.ForListener(listener.name());
      for (const ServedCertificate& cert : rt.tls->certificates()) {
        metrics_.SetCertificateNotAfter(listener.name(), cert.key,
                                        static_cast<double>(cert.not_after));
        spdlog::info(
            "listener '{}': key {}{} serves {} ({}){}", listener.name(), cert.key,
            cert.version != 0 ? absl::StrCat(" v", cert.version) : "", cert.subject,
            cert.server_names.empty() ? "no SNI names" : absl::StrJoin(cert.server_names, " "),
            cert.is_default ? ", default" : "");
      }
      state->listeners.push_back(std::move(rt));
    }
    return std::shared_ptr<const ProxyState>(std::move(state));
  }

  // CheckReloadable refuses changes a running proxy cannot apply.
  absl::Status CheckReloadable(const ProxyConfig& next) const {
    using google::protobuf::util::MessageDifferencer;
    if (next.workers() != config_.workers()) {
      return absl::FailedPreconditionError("workers changed: restart the proxy to apply it");
    }
    if (!MessageDifferencer::Equals(next.key_service(), config_.key_service())) {
      return absl::FailedPreconditionError("key_service changed: restart the proxy to apply it");
    }
    if (next.metrics().listen() != config_.metrics().listen()) {
      return absl::FailedPreconditionError("metrics.listen changed: restart the proxy to apply it");
    }
    bool same = next.listeners_size() == config_.listeners_size();
    for (int i = 0; same && i < next.listeners_size(); ++i) {
      same = next.listeners(i).name() == config_.listeners(i).name() &&
             next.listeners(i).listen() == config_.listeners(i).listen();
    }
    if (!same) {
      return absl::FailedPreconditionError(
          "the listeners' names or addresses changed: restart the proxy to apply it");
    }
    return absl::OkStatus();
  }

  void Reload() {
    spdlog::info("SIGHUP: reloading {}", config_path_);
    absl::Status st = [&]() -> absl::Status {
      CUSTODY_ASSIGN_OR_RETURN(ProxyConfig next, LoadProxyConfig(config_path_));
      CUSTODY_RETURN_IF_ERROR(CheckReloadable(next));
      CUSTODY_ASSIGN_OR_RETURN(auto state, BuildState(next, state_->generation + 1));
      state_ = std::move(state);
      config_ = std::move(next);
      for (auto& w : workers_) {
        w->SetState(state_);
      }
      return absl::OkStatus();
    }();
    metrics_.RecordReload(st.ok());
    if (st.ok()) {
      spdlog::info("reload done: configuration generation {} serves new connections",
                   state_->generation);
    } else {
      spdlog::error("reload refused, the running configuration stays: {}", st.message());
    }
  }

  const std::string config_path_;
  ProxyConfig config_;
  ProxyMetrics metrics_;
  std::shared_ptr<provider::KeySigner> signer_;
  OsslPtr<OSSL_LIB_CTX> libctx_;
  provider::LoadedProviders providers_;  // Unloaded before libctx_ is freed.
  std::shared_ptr<const ProxyState> state_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::thread> threads_;
  std::atomic<int> running_{0};
};

}  // namespace

void BlockProxySignals() {
  BlockTerminationSignals();
  signal(SIGPIPE, SIG_IGN);
}

absl::Status RunProxy(const ProxyConfig& config, const std::string& config_path) {
  ProxyServer server(config_path);
  CUSTODY_RETURN_IF_ERROR(server.Start(config));
  server.Serve();
  return absl::OkStatus();
}

}  // namespace custody::proxy
