#include "common/metrics_endpoint.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <prometheus/counter.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <string>

namespace custody {
namespace {

// Connect returns a connected socket to 127.0.0.1:port, or -1.
int Connect(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return -1;
  }
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Get returns the whole HTTP answer to GET /metrics on 127.0.0.1:port.
std::string Get(uint16_t port) {
  const int fd = Connect(port);
  if (fd < 0) {
    return "";
  }
  // A guard against a hang, not a timing check: an answer comes in milliseconds or never.
  const timeval guard{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &guard, sizeof guard);
  const std::string req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  (void)::write(fd, req.data(), req.size());
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) {
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

TEST(MetricsEndpointTest, ServesTheRegistryAndLetsGoOfThePortWhenDestroyed) {
  auto registry = std::make_shared<prometheus::Registry>();
  prometheus::BuildCounter()
      .Name("custody_test_total")
      .Help("a test")
      .Register(*registry)
      .Add({})
      .Increment(3);
  for (int round = 0; round < 5; ++round) {  // Stop and start again, as a restart would.
    auto endpoint = ServeMetrics("127.0.0.1:0", registry);
    ASSERT_TRUE(endpoint.ok()) << endpoint.status();
    const uint16_t port = endpoint->port;
    ASSERT_NE(port, 0);
    EXPECT_NE(Get(port).find("custody_test_total 3"), std::string::npos);
    endpoint->exposer.reset();
    const int after = Connect(port);
    EXPECT_LT(after, 0) << "the port still accepts after the endpoint stopped";
    if (after >= 0) {
      ::close(after);
    }
  }
}

TEST(MetricsEndpointTest, AClientThatSaysNothingDoesNotHoldScrapesUp) {
  auto registry = std::make_shared<prometheus::Registry>();
  prometheus::BuildCounter().Name("custody_test_total").Help("a test").Register(*registry).Add({});
  auto endpoint = ServeMetrics("127.0.0.1:0", registry);
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  const int silent = Connect(endpoint->port);  // Connects, never sends a request.
  ASSERT_GE(silent, 0);
  EXPECT_NE(Get(endpoint->port).find("custody_test_total 0"), std::string::npos)
      << "a scrape waited behind a silent client";
  ::close(silent);
}

TEST(MetricsEndpointTest, AnAddressInUseIsRefusedByName) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto first = ServeMetrics("127.0.0.1:0", registry);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string listen = "127.0.0.1:" + std::to_string(first->port);
  auto second = ServeMetrics(listen, registry);
  ASSERT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find(listen), absl::string_view::npos);
}

}  // namespace
}  // namespace custody
