#include "proxy/proxy_protocol.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace custody::proxy {
namespace {

// Endpoint is an address reduced to what the header carries.
struct Endpoint {
  int family = AF_UNSPEC;    // AF_INET or AF_INET6; AF_UNSPEC when not a TCP/IP address.
  unsigned char addr[16]{};  // 4 or 16 bytes, network order.
  uint16_t port = 0;         // Host order.
};

Endpoint ToEndpoint(const sockaddr_storage& ss) {
  Endpoint e;
  if (ss.ss_family == AF_INET) {
    const auto& in = reinterpret_cast<const sockaddr_in&>(ss);
    e.family = AF_INET;
    std::memcpy(e.addr, &in.sin_addr, 4);
    e.port = ntohs(in.sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto& in6 = reinterpret_cast<const sockaddr_in6&>(ss);
    e.port = ntohs(in6.sin6_port);
    if (IN6_IS_ADDR_V4MAPPED(&in6.sin6_addr)) {
      e.family = AF_INET;
      std::memcpy(e.addr, in6.sin6_addr.s6_addr + 12, 4);
    } else {
      e.family = AF_INET6;
      std::memcpy(e.addr, in6.sin6_addr.s6_addr, 16);
    }
  }
  return e;
}

std::string Text(const Endpoint& e) {
  char buf[INET6_ADDRSTRLEN] = {};
  ::inet_ntop(e.family, e.addr, buf, sizeof(buf));
  return buf;
}

// The version 2 signature: \r\n\r\n\0\r\nQUIT\n.
constexpr unsigned char kV2Signature[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                            0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

void PutPort(std::string& out, uint16_t port) {
  out.push_back(static_cast<char>(port >> 8));
  out.push_back(static_cast<char>(port & 0xff));
}

}  // namespace

std::string AddressText(const sockaddr_storage& addr) {
  const Endpoint e = ToEndpoint(addr);
  if (e.family == AF_INET) {
    return absl::StrCat(Text(e), ":", e.port);
  }
  if (e.family == AF_INET6) {
    return absl::StrCat("[", Text(e), "]:", e.port);
  }
  return "?";
}

std::optional<ProxyProtocol> ParseProxyProtocol(std::string_view value) {
  if (value.empty() || value == "off") {
    return ProxyProtocol::kOff;
  }
  if (value == "v1") {
    return ProxyProtocol::kV1;
  }
  if (value == "v2") {
    return ProxyProtocol::kV2;
  }
  return std::nullopt;
}

std::string ProxyProtocolHeader(ProxyProtocol version, const sockaddr_storage& client,
                                const sockaddr_storage& local) {
  const Endpoint src = ToEndpoint(client);
  const Endpoint dst = ToEndpoint(local);
  const bool known = src.family != AF_UNSPEC && src.family == dst.family;
  switch (version) {
    case ProxyProtocol::kOff:
      return "";
    case ProxyProtocol::kV1:
      if (!known) {
        return "PROXY UNKNOWN\r\n";
      }
      return absl::StrCat("PROXY ", src.family == AF_INET ? "TCP4 " : "TCP6 ", Text(src), " ",
                          Text(dst), " ", src.port, " ", dst.port, "\r\n");
    case ProxyProtocol::kV2: {
      std::string out(reinterpret_cast<const char*>(kV2Signature), sizeof(kV2Signature));
      if (!known) {
        out.push_back(0x20);  // Version 2, LOCAL.
        out.push_back(0x00);  // UNSPEC.
        PutPort(out, 0);      // No address block.
        return out;
      }
      const size_t alen = src.family == AF_INET ? 4 : 16;
      out.push_back(0x21);                                        // Version 2, PROXY.
      out.push_back(src.family == AF_INET ? 0x11 : 0x21);         // TCP over IPv4 / IPv6.
      PutPort(out, static_cast<uint16_t>(2 * alen + 4));          // Address block length.
      out.append(reinterpret_cast<const char*>(src.addr), alen);  // Source address.
      out.append(reinterpret_cast<const char*>(dst.addr), alen);  // Destination address.
      PutPort(out, src.port);
      PutPort(out, dst.port);
      return out;
    }
  }
  return "";
}

}  // namespace custody::proxy
