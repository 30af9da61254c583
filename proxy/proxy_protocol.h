// The PROXY protocol (HAProxy's, versions 1 and 2): a header the proxy sends its backend first,
// so that the backend learns the client's address and the address the client connected to.
// https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt
#pragma once

#include <sys/socket.h>

#include <optional>
#include <string>
#include <string_view>

namespace custody::proxy {

enum class ProxyProtocol { kOff, kV1, kV2 };

// ParseProxyProtocol reads a config value: "v1", "v2", or "off" / "" (none); nullopt otherwise.
std::optional<ProxyProtocol> ParseProxyProtocol(std::string_view value);

// ProxyProtocolHeader is the header for a TCP connection from `client` to `local` (the proxy's
// listening address). IPv4-mapped IPv6 addresses are written as IPv4. Other address families
// give version 1's "PROXY UNKNOWN" or version 2's LOCAL command, as the specification says for
// a connection whose addresses cannot be told. Empty for kOff.
std::string ProxyProtocolHeader(ProxyProtocol version, const sockaddr_storage& client,
                                const sockaddr_storage& local);

// AddressText writes a TCP/IP address for logs: "192.0.2.7:51000", "[2001:db8::7]:51000"
// (IPv4-mapped IPv6 as IPv4); "?" for anything else.
std::string AddressText(const sockaddr_storage& addr);

}  // namespace custody::proxy
