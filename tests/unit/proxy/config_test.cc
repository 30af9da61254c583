#include "proxy/config.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

#include "common/yaml_proto.h"
#include "keyservice/client.h"

namespace custody::proxy {
namespace {

class ProxyConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/proxycfg-" + std::to_string(::getpid());
    ::mkdir(dir_.c_str(), 0700);
    for (const char* f : {"ca", "cert", "key", "chain"}) {
      std::ofstream(dir_ + "/" + f) << "x";
    }
    ::chmod((dir_ + "/key").c_str(), 0600);
  }

  std::string KeyService() const {
    return "key_service: {addresses: ['127.0.0.1:7001'], ca_file: " + dir_ +
           "/ca, cert_file: " + dir_ + "/cert, key_file: " + dir_ + "/key}\n";
  }

  // Listener is one listener with `certs` (a YAML flow list) and `extra` fields.
  static std::string Listener(const std::string& certs = "[{key: lab-ec256}]",
                              const std::string& extra = "") {
    return "listeners:\n  - {listen: '127.0.0.1:8443', certificates: " + certs +
           ", backend: {address: '127.0.0.1:8080'}" + extra + "}\n";
  }

  absl::StatusOr<custody::v1::ProxyConfig> Parse(const std::string& yaml) const {
    custody::v1::ProxyConfig config;
    if (absl::Status st = ParseYamlToProto(yaml, "test.yaml", &config); !st.ok()) {
      return st;
    }
    if (absl::Status st = ValidateProxyConfig(config); !st.ok()) {
      return st;
    }
    return config;
  }

  // ExpectError checks that `yaml` is refused with a message containing every one of `parts`.
  void ExpectError(const std::string& yaml, std::initializer_list<std::string> parts) const {
    auto config = Parse(yaml);
    ASSERT_FALSE(config.ok()) << yaml;
    for (const std::string& part : parts) {
      EXPECT_NE(std::string(config.status().message()).find(part), std::string::npos)
          << "message: " << config.status().message() << "\nexpected: " << part;
    }
  }

  std::string dir_;
};

TEST_F(ProxyConfigTest, MinimalConfigGetsSecureDefaults) {
  auto config = Parse(KeyService() + Listener());
  ASSERT_TRUE(config.ok()) << config.status();
  const auto& l = config->listeners(0);
  EXPECT_EQ(l.name(), "listener0");
  EXPECT_EQ(l.tls().min_version(), "1.2");
  EXPECT_EQ(l.tls().max_version(), "1.3");
  EXPECT_NE(l.tls().ciphers().find("ECDHE"), std::string::npos);
  EXPECT_EQ(l.tls().ciphers().find("CBC"), std::string::npos);
  EXPECT_TRUE(l.tls().has_session_tickets());
  EXPECT_EQ(l.tls().session_tickets(), 1u) << "one ticket per full handshake";
  EXPECT_TRUE(l.certificates(0).default_()) << "the only certificate is the default";
  EXPECT_EQ(l.backend().connect_timeout_ms(), kDefaultConnectTimeoutMs);
  EXPECT_EQ(config->key_service().sign_timeout_ms(), kDefaultSignTimeoutMs);
  EXPECT_EQ(config->limits().max_connections(), kDefaultMaxConnections);
  EXPECT_EQ(config->limits().max_handshakes(), kDefaultMaxHandshakes);
  EXPECT_EQ(config->limits().handshake_timeout_ms(), kDefaultHandshakeTimeoutMs);
  EXPECT_EQ(config->limits().idle_timeout_ms(), kDefaultIdleTimeoutMs);
  EXPECT_EQ(config->limits().buffer_bytes(), kDefaultBufferBytes);
  EXPECT_EQ(config->limits().drain_timeout_ms(), kDefaultDrainTimeoutMs);
  EXPECT_EQ(config->limits().relay_turn_bytes(), kDefaultRelayTurnBytes);
  EXPECT_EQ(kDefaultRelayTurnBytes, 2097152u) << "2 MiB per turn, about 2 ms of a worker";
}

TEST_F(ProxyConfigTest, UnknownFieldIsNamed) {
  ExpectError(KeyService() + Listener() + "limits: {max_conections: 5}\n", {"max_conections"});
  ExpectError(KeyService() +
                  "listeners:\n  - {listen: '127.0.0.1:8443', certificates: [{key: a, "
                  "key_file: /etc/k.pem}], backend: {address: 'h:1'}}\n",
              {"key_file"});
}

TEST_F(ProxyConfigTest, KeyServiceIsRequiredAndChecked) {
  ExpectError(Listener(), {"key_service.addresses", "required"});
  ExpectError("key_service: {addresses: ['127.0.0.1:7001'], ca_file: /nonexistent, cert_file: " +
                  dir_ + "/cert, key_file: " + dir_ + "/key}\n" + Listener(),
              {"key_service.ca_file", "/nonexistent"});
  ::chmod((dir_ + "/key").c_str(), 0644);
  ExpectError(KeyService() + Listener(), {"key_service.key_file"});
  ::chmod((dir_ + "/key").c_str(), 0600);
  ExpectError("key_service: {addresses: ['127.0.0.1:7001', 'localhost:7002'], ca_file: " + dir_ +
                  "/ca, cert_file: " + dir_ + "/cert, key_file: " + dir_ + "/key}\n" + Listener(),
              {"key_service.addresses", "IP literals"});
  ExpectError("key_service: {addresses: ['127.0.0.1:7001'], ca_file: " + dir_ +
                  "/ca, cert_file: " + dir_ + "/cert, key_file: " + dir_ +
                  "/key, sign_timeout_ms: 70000}\n" + Listener(),
              {"key_service.sign_timeout_ms"});
}

TEST_F(ProxyConfigTest, SigningSocketIsAnAbsolutePath) {
  const std::string unix_ks = "key_service: {addresses: ['unix:/run/custody/keyd.sock'], ";
  auto ok = Parse(unix_ks + "signing_socket: /run/custody/keyd-sign.sock}\n" + Listener());
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->key_service().signing_socket(), "/run/custody/keyd-sign.sock");
  // Beside TCP replicas too: the local keyd signs, the replicas take over when it cannot.
  std::string tcp = KeyService();
  tcp.insert(tcp.rfind('}'), ", signing_socket: /run/custody/keyd-sign.sock");
  EXPECT_TRUE(Parse(tcp + Listener()).ok());
  ExpectError(unix_ks + "signing_socket: run/keyd-sign.sock}\n" + Listener(),
              {"key_service.signing_socket", "absolute path"});
  ExpectError(unix_ks + "signing_socket: /" + std::string(120, 'a') + "}\n" + Listener(),
              {"key_service.signing_socket", "107 bytes"});
}

TEST_F(ProxyConfigTest, CertificatesAreChecked) {
  ExpectError(KeyService() + Listener("[]"), {"listeners[0].certificates", "at least one"});
  ExpectError(KeyService() + Listener("[{key: 'bad name'}]"), {"certificates[0].key"});
  ExpectError(KeyService() + Listener("[{key: a, server_names: ['a..b']}]"),
              {"server_names[0]", "not a DNS name"});
  ExpectError(KeyService() + Listener("[{key: a, server_names: ['x.*.test']}]"),
              {"server_names[0]"});
  ExpectError(KeyService() + Listener("[{key: a, server_names: [A.test]}, "
                                      "{key: b, server_names: [a.TEST]}]"),
              {"certificates[1].server_names[0]", "already served"});
  ExpectError(KeyService() + Listener("[{key: a, default: true}, {key: b, default: true}]"),
              {"more than one certificate says default"});
  ExpectError(KeyService() + Listener("[{key: a, chain_file: /nonexistent.pem}]"),
              {"certificates[0].chain_file"});
  auto ok = Parse(KeyService() + Listener("[{key: a, server_names: ['*.Lab.Test']}, "
                                          "{key: b, default: true}]"));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->listeners(0).certificates(0).server_names(0), "*.lab.test");
  EXPECT_FALSE(ok->listeners(0).certificates(0).default_());
  EXPECT_TRUE(ok->listeners(0).certificates(1).default_());
}

TEST_F(ProxyConfigTest, TlsSettingsAreSecure) {
  ExpectError(KeyService() + Listener("[{key: a}]", ", tls: {min_version: '1.1'}"),
              {"tls.min_version", "1.2"});
  ExpectError(KeyService() + Listener("[{key: a}]",
                                      ", tls: {min_version: '1.3', max_version: "
                                      "'1.2'}"),
              {"tls.min_version", "above max_version"});
  ExpectError(KeyService() + Listener("[{key: a}]", ", tls: {ciphers: 'AES128-SHA'}"),
              {"tls.ciphers", "AES128-SHA", "forward-secret AEAD"});
  ExpectError(KeyService() + Listener("[{key: a}]", ", tls: {ciphers: 'ECDHE-RSA-AES128-SHA'}"),
              {"tls.ciphers", "forward-secret AEAD"});
  ExpectError(KeyService() + Listener("[{key: a}]", ", tls: {ciphers: 'NOPE'}"),
              {"tls.ciphers", "no cipher"});
  ExpectError(KeyService() + Listener("[{key: a}]", ", tls: {ciphersuites: 'TLS_NOPE'}"),
              {"tls.ciphersuites"});
  ExpectError(KeyService() + Listener("[{key: a}]", ", tls: {groups: 'P-999'}"), {"tls.groups"});
  ExpectError(KeyService() + Listener("[{key: a}]", ", tls: {alpn: [h2, h2]}"),
              {"tls.alpn[1]", "twice"});
  ExpectError(KeyService() + Listener("[{key: a}]", ", tls: {alpn: ['']}"), {"tls.alpn[0]"});
  ExpectError(KeyService() + Listener("[{key: a}]", ", tls: {session_tickets: 9}"),
              {"tls.session_tickets", "maximum of 8"});
  auto no_tickets = Parse(KeyService() + Listener("[{key: a}]", ", tls: {session_tickets: 0}"));
  ASSERT_TRUE(no_tickets.ok()) << no_tickets.status();
  EXPECT_TRUE(no_tickets->listeners(0).tls().has_session_tickets()) << "0 is kept, not defaulted";
  EXPECT_EQ(no_tickets->listeners(0).tls().session_tickets(), 0u);
  // TLS 1.3 only needs no TLS 1.2 cipher.
  EXPECT_TRUE(Parse(KeyService() + Listener("[{key: a}]", ", tls: {min_version: '1.3'}")).ok());
}

TEST_F(ProxyConfigTest, ListenersAndBackendsAreChecked) {
  ExpectError(KeyService(), {"listeners", "at least one"});
  ExpectError(KeyService() +
                  "listeners:\n"
                  "  - {listen: '127.0.0.1:8443', certificates: [{key: a}], backend: {address: "
                  "'h:1'}}\n"
                  "  - {listen: '127.0.0.1:8443', certificates: [{key: a}], backend: {address: "
                  "'h:1'}}\n",
              {"listeners[1].listen", "two listeners"});
  ExpectError(
      KeyService() + "listeners:\n  - {listen: '127.0.0.1:8443', certificates: [{key: a}]}\n",
      {"listeners[0].backend.address", "required"});
  ExpectError(KeyService() +
                  "listeners:\n  - {listen: '127.0.0.1:8443', certificates: [{key: "
                  "a}], backend: {address: 'unix:relative'}}\n",
              {"backend.address", "unix:/absolute/path"});
  ExpectError(KeyService() +
                  "listeners:\n  - {listen: '8443', certificates: [{key: a}], "
                  "backend: {address: 'h:1'}}\n",
              {"listeners[0].listen"});
  ExpectError(KeyService() + Listener() + "metrics: {listen: '0.0.0.0:9100'}\n",
              {"metrics.listen", "loopback"});
  ExpectError(KeyService() + Listener() + "limits: {buffer_bytes: 100}\n",
              {"limits.buffer_bytes", "4096"});
  ExpectError(KeyService() + Listener() + "limits: {relay_turn_bytes: 1000}\n",
              {"limits.relay_turn_bytes", "4096", "67108864"});
  ExpectError(KeyService() + Listener() + "limits: {relay_turn_bytes: 100000000}\n",
              {"limits.relay_turn_bytes", "67108864"});
  ExpectError(KeyService() + Listener() + "workers: 1000\n", {"workers"});
}

TEST_F(ProxyConfigTest, ProxyProtocolIsV1V2OrOffAndAnythingElseIsNamed) {
  for (const char* ok : {"v1", "v2", "off"}) {
    const std::string yaml = KeyService() +
                             "listeners:\n  - {listen: '127.0.0.1:8443', certificates: [{key: "
                             "lab-ec256}], backend: {address: '127.0.0.1:8080', proxy_protocol: " +
                             ok + "}}\n";
    auto config = Parse(yaml);
    EXPECT_TRUE(config.ok()) << ok << ": " << config.status();
  }
  ExpectError(KeyService() +
                  "listeners:\n  - {listen: '127.0.0.1:8443', certificates: [{key: lab-ec256}], "
                  "backend: {address: '127.0.0.1:8080', proxy_protocol: v3}}\n",
              {"listeners[0].backend.proxy_protocol", "'v3'", "v1, v2 or off"});
}

TEST(BackendAddressTest, TcpAndUnix) {
  auto tcp = ParseBackendAddress("127.0.0.1:8080");
  ASSERT_TRUE(tcp.ok());
  EXPECT_EQ(tcp->host, "127.0.0.1");
  EXPECT_EQ(tcp->port, 8080);
  auto un = ParseBackendAddress("unix:/run/app.sock");
  ASSERT_TRUE(un.ok());
  EXPECT_EQ(un->unix_path, "/run/app.sock");
  EXPECT_FALSE(ParseBackendAddress("unix:").ok());
  EXPECT_FALSE(ParseBackendAddress("unix:/" + std::string(200, 'a')).ok());
}

TEST(ChannelTargetTest, OneAddressOrSeveralReplicas) {
  auto one = keyservice::MakeChannelTarget("keyd.internal:7443");
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->target, "keyd.internal:7443");
  EXPECT_FALSE(one->balanced);
  auto v4 = keyservice::MakeChannelTarget("127.0.0.1:7001, 127.0.0.2:7002");
  ASSERT_TRUE(v4.ok());
  EXPECT_EQ(v4->target, "ipv4:127.0.0.1:7001,127.0.0.2:7002");
  EXPECT_EQ(v4->first_host, "127.0.0.1");
  EXPECT_TRUE(v4->balanced);
  auto v6 = keyservice::MakeChannelTarget("[::1]:7001,[::1]:7002");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(v6->target, "ipv6:[::1]:7001,[::1]:7002");
  EXPECT_FALSE(keyservice::MakeChannelTarget("127.0.0.1:1,[::1]:2").ok());
  EXPECT_FALSE(keyservice::MakeChannelTarget("a.example:1,b.example:2").ok());
  EXPECT_FALSE(keyservice::MakeChannelTarget("").ok());
}

}  // namespace
}  // namespace custody::proxy
