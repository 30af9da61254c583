#include "common/metrics_endpoint.h"

#include <fcntl.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <exception>
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

// Knock opens and closes one connection to host:port without waiting for it.
void Knock(const addrinfo& ai) {
  const int fd =
      ::socket(ai.ai_family, ai.ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai.ai_protocol);
  if (fd < 0) {
    return;
  }
  (void)::connect(fd, ai.ai_addr, ai.ai_addrlen);
  ::close(fd);
}

}  // namespace

// civetweb's listening thread polls its sockets in quanta of 2 s and looks at the stop flag only
// between them, so deleting an idle Exposer (mg_stop) takes up to 2 s: every SIGTERM of keyd or
// the proxy paid it after draining. A connection ends the poll at once; knock until the delete
// returns (a knock that lands before the flag is set is served like any request).
void StopExposer::operator()(prometheus::Exposer* exposer) const {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  if (port == 0 || ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found) != 0) {
    found = nullptr;
  }
  std::atomic<bool> stopped{false};
  std::thread knocker;
  if (found != nullptr) {
    knocker = std::thread([&] {
      while (!stopped.load()) {
        Knock(*found);
        std::this_thread::sleep_for(kKnockInterval);
      }
    });
  }
  delete exposer;
  stopped = true;
  if (knocker.joinable()) {
    knocker.join();
  }
  if (found != nullptr) {
    ::freeaddrinfo(found);
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
  StopExposer& stop = endpoint.exposer.get_deleter();
  stop.port = endpoint.port;
  if (auto hp = ParseHostPort(listen, /*allow_zero_port=*/true); hp.ok()) {
    stop.host = hp->host;
  }
  if (stop.host.empty() || stop.host == "0.0.0.0" || stop.host == "*") {
    stop.host = "127.0.0.1";
  } else if (stop.host == "::") {
    stop.host = "::1";
  }
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
