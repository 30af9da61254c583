#include "proxy/proxy_protocol.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/un.h>

#include <string>

namespace custody::proxy {
namespace {

sockaddr_storage V4(const char* ip, uint16_t port) {
  sockaddr_storage ss{};
  auto& in = reinterpret_cast<sockaddr_in&>(ss);
  in.sin_family = AF_INET;
  in.sin_port = htons(port);
  ::inet_pton(AF_INET, ip, &in.sin_addr);
  return ss;
}

sockaddr_storage V6(const char* ip, uint16_t port) {
  sockaddr_storage ss{};
  auto& in6 = reinterpret_cast<sockaddr_in6&>(ss);
  in6.sin6_family = AF_INET6;
  in6.sin6_port = htons(port);
  ::inet_pton(AF_INET6, ip, &in6.sin6_addr);
  return ss;
}

std::string Bytes(std::initializer_list<int> b) {
  std::string s;
  for (int v : b) {
    s.push_back(static_cast<char>(v));
  }
  return s;
}

const std::string kSignature =
    Bytes({0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A});

TEST(ProxyProtocolTest, ParsesTheConfigValues) {
  EXPECT_EQ(ParseProxyProtocol(""), ProxyProtocol::kOff);
  EXPECT_EQ(ParseProxyProtocol("off"), ProxyProtocol::kOff);
  EXPECT_EQ(ParseProxyProtocol("v1"), ProxyProtocol::kV1);
  EXPECT_EQ(ParseProxyProtocol("v2"), ProxyProtocol::kV2);
  EXPECT_EQ(ParseProxyProtocol("V2"), std::nullopt);
  EXPECT_EQ(ParseProxyProtocol("2"), std::nullopt);
}

TEST(ProxyProtocolTest, VersionOneIsOneTextLine) {
  EXPECT_EQ(ProxyProtocolHeader(ProxyProtocol::kV1, V4("192.0.2.7", 51000), V4("10.0.0.1", 443)),
            "PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n");
  EXPECT_EQ(ProxyProtocolHeader(ProxyProtocol::kV1, V6("2001:db8::7", 51000), V6("::1", 8443)),
            "PROXY TCP6 2001:db8::7 ::1 51000 8443\r\n");
  // A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6: they are written as IPv4.
  EXPECT_EQ(
      ProxyProtocolHeader(ProxyProtocol::kV1, V6("::ffff:192.0.2.7", 1), V6("::ffff:10.0.0.1", 2)),
      "PROXY TCP4 192.0.2.7 10.0.0.1 1 2\r\n");
  EXPECT_EQ(ProxyProtocolHeader(ProxyProtocol::kV1, sockaddr_storage{}, V4("10.0.0.1", 443)),
            "PROXY UNKNOWN\r\n");
}

TEST(ProxyProtocolTest, VersionTwoIsTheBinaryLayout) {
  EXPECT_EQ(ProxyProtocolHeader(ProxyProtocol::kV2, V4("192.0.2.7", 51000), V4("10.0.0.1", 443)),
            kSignature + Bytes({0x21, 0x11, 0x00, 0x0C,     // PROXY, TCP4, 12 bytes follow
                                192, 0, 2, 7, 10, 0, 0, 1,  // source, destination
                                0xC7, 0x38, 0x01, 0xBB}));  // 51000, 443
  const std::string v6 =
      ProxyProtocolHeader(ProxyProtocol::kV2, V6("2001:db8::7", 1), V6("::1", 2));
  ASSERT_EQ(v6.size(), 16u + 36u);
  EXPECT_EQ(v6.substr(0, 16), kSignature + Bytes({0x21, 0x21, 0x00, 0x24}));
  EXPECT_EQ(v6.substr(16, 2), Bytes({0x20, 0x01}));
  EXPECT_EQ(v6.substr(32 + 15, 1), Bytes({0x01}));  // ::1's last byte
  EXPECT_EQ(v6.substr(48), Bytes({0x00, 0x01, 0x00, 0x02}));
  // Addresses that cannot be told: the LOCAL command, no address block.
  EXPECT_EQ(ProxyProtocolHeader(ProxyProtocol::kV2, sockaddr_storage{}, V4("10.0.0.1", 443)),
            kSignature + Bytes({0x20, 0x00, 0x00, 0x00}));
}

TEST(ProxyProtocolTest, AddressTextForLogs) {
  EXPECT_EQ(AddressText(V4("192.0.2.7", 51000)), "192.0.2.7:51000");
  EXPECT_EQ(AddressText(V6("2001:db8::7", 443)), "[2001:db8::7]:443");
  EXPECT_EQ(AddressText(V6("::ffff:192.0.2.7", 1)), "192.0.2.7:1");
  EXPECT_EQ(AddressText(sockaddr_storage{}), "?");
}

TEST(ProxyProtocolTest, OffSendsNothing) {
  EXPECT_EQ(ProxyProtocolHeader(ProxyProtocol::kOff, V4("192.0.2.7", 1), V4("10.0.0.1", 2)), "");
}

}  // namespace
}  // namespace custody::proxy
