#include "common/metrics_endpoint.h"

#include <fcntl.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/config_check.h"

namespace custody {
namespace {

// The endpoint's worker threads, and how long each waits for a client's request.
constexpr int kWorkers = 2;
constexpr int kRequestTimeoutMs = 10000;

// How often StopExposer knocks while civetweb stops.
constexpr auto kKnockInterval = std::chrono::milliseconds(20);

// Knock opens and closes one connection to `addr` without waiting for it.
void Knock(const sockaddr_storage& addr) {
  const socklen_t len = addr.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
  const int fd = ::socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return;
  }
  (void)::connect(fd, reinterpret_cast<const sockaddr*>(&addr), len);
  ::close(fd);
}

// Resolve lists the addresses of host:port (every family the name has: civetweb may listen on
// either of localhost's).
std::vector<sockaddr_storage> Resolve(const std::string& host, uint16_t port) {
  std::vector<sockaddr_storage> out;
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (port == 0 || ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) {
    return out;
  }
  for (const addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
    if ((ai->ai_family == AF_INET || ai->ai_family == AF_INET6) &&
        ai->ai_addrlen <= sizeof(sockaddr_storage)) {
      sockaddr_storage addr{};
      std::memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
      out.push_back(addr);
    }
  }
  ::freeaddrinfo(found);
  return out;
}

}  // namespace

// civetweb's listening thread polls its sockets in quanta of 2 s and looks at the stop flag only
// between them, so deleting an idle Exposer (mg_stop) takes up to 2 s: every SIGTERM of keyd or
// the proxy paid it after draining. A connection ends the poll at once: knock until the delete
// returns. (civetweb closes a knock that lands before the flag is set without a word, as a
// client that sent no request.) A worker waiting on a client's open connection still holds the
// stop up to 2 s; knocks cannot reach it.
void StopExposer::operator()(prometheus::Exposer* exposer) const noexcept {
  std::mutex mu;
  std::condition_variable wake;
  bool stopped = false;
  std::thread knocker;
  if (!addresses.empty()) {
    try {
      knocker = std::thread([&] {
        std::unique_lock<std::mutex> lock(mu);
        while (!stopped) {
          for (const sockaddr_storage& addr : addresses) {
            Knock(addr);
          }
          wake.wait_for(lock, kKnockInterval);
        }
      });
    } catch (const std::system_error&) {
      // No thread to spare: a plain stop, up to 2 s.
    }
  }
  delete exposer;
  {
    std::lock_guard<std::mutex> lock(mu);
    stopped = true;
  }
  wake.notify_all();
  if (knocker.joinable()) {
    knocker.join();
  }
}

absl::StatusOr<MetricsEndpoint> ServeMetrics(
    const std::string& listen, const std::shared_ptr<prometheus::Registry>& registry) {
  MetricsEndpoint endpoint;
  try {
    // prometheus-cpp (civetweb) reports a failed bind by exception; it stops here.
    // civetweb serves one connection per worker thread and waits up to request_timeout_ms
    // (30 s by default) for a request: with one worker, a client that connects and says nothing
    // held every scrape up for 30 s. Two workers, and a request must arrive within 10 s
    // (Prometheus's default scrape timeout).
    endpoint.exposer.reset(new prometheus::Exposer(
        std::vector<std::string>{"listening_ports", listen, "num_threads", std::to_string(kWorkers),
                                 "request_timeout_ms", std::to_string(kRequestTimeoutMs)}));
  } catch (const std::exception& e) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot serve metrics on ", listen, ": ", e.what()));
  }
  endpoint.exposer->RegisterCollectable(registry);
  const auto ports = endpoint.exposer->GetListeningPorts();
  endpoint.port = ports.empty() ? uint16_t{0} : static_cast<uint16_t>(ports.front());
  std::string host;
  if (auto hp = ParseHostPort(listen, /*allow_zero_port=*/true); hp.ok()) {
    host = hp->host;
  }
  if (host.empty() || host == "0.0.0.0" || host == "*") {
    host = "127.0.0.1";
  } else if (host == "::") {
    host = "::1";
  }
  endpoint.exposer.get_deleter().addresses = Resolve(host, endpoint.port);
  return endpoint;
}

prometheus::Histogram::BucketBoundaries DoublingBuckets(double from, double to) {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = from; v < to; v *= 2) {
    b.push_back(v);
  }
  return b;
}

}  // namespace custody
