#include "keyservice/config.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <string>
#include <vector>

#include "common/yaml_proto.h"

namespace custody::keyservice {
namespace {

TEST(HostPortTest, ParsesV4V6AndNames) {
  auto a = ParseHostPort("127.0.0.1:7443");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 7443);
  auto b = ParseHostPort("[::1]:1");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->host, "::1");
  EXPECT_TRUE(ParseHostPort("localhost:80").ok());
  for (const char* bad :
       {"", "7443", ":7443", "host:", "host:0", "host:70000", "::1:80", "[::1]80", "host:12x"}) {
    EXPECT_FALSE(ParseHostPort(bad).ok()) << bad;
  }
  EXPECT_TRUE(ParseHostPort("host:0", /*allow_zero_port=*/true).ok());
}

TEST(HostPortTest, LoopbackHosts) {
  EXPECT_TRUE(IsLoopbackHost("127.0.0.1"));
  EXPECT_TRUE(IsLoopbackHost("127.3.2.1"));
  EXPECT_TRUE(IsLoopbackHost("::1"));
  EXPECT_TRUE(IsLoopbackHost("localhost"));
  EXPECT_FALSE(IsLoopbackHost("0.0.0.0"));
  EXPECT_FALSE(IsLoopbackHost("10.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("example.com"));
}

class ValidateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/cfg-" + std::to_string(::getpid());
    ::mkdir(dir_.c_str(), 0700);
    for (const char* f : {"cert", "key", "ca", "module", "pin"}) {
      std::ofstream(dir_ + "/" + f) << "x";
    }
    ::chmod((dir_ + "/key").c_str(), 0600);
    ::chmod((dir_ + "/pin").c_str(), 0600);
  }
  std::string Yaml(const std::string& extra = "") const {
    return "listen: 127.0.0.1:7443\n"
           "tls: {cert_file: " +
           dir_ + "/cert, key_file: " + dir_ + "/key, client_ca_file: " + dir_ +
           "/ca}\n"
           "hsm: {module: " +
           dir_ + "/module, token_label: t, pin_file: " + dir_ +
           "/pin}\n"
           "audit: {path: " +
           dir_ + "/audit.log}\n" + extra;
  }
  absl::Status Validate(const std::string& yaml, custody::v1::KeydConfig* out) {
    absl::Status st = ParseYamlToProto(yaml, "t.yaml", out);
    return st.ok() ? ValidateKeydConfig(*out) : st;
  }
  std::string dir_;
};

TEST_F(ValidateTest, MinimalConfigGetsDefaults) {
  custody::v1::KeydConfig c;
  ASSERT_TRUE(Validate(Yaml(), &c).ok());
  EXPECT_EQ(c.hsm().sessions(), kDefaultSessions);
  EXPECT_EQ(c.limits().sign_timeout_ms(), kDefaultSignTimeoutMs);
  EXPECT_EQ(c.limits().max_message_bytes(), kDefaultMaxMessageBytes);
}

TEST_F(ValidateTest, EachProblemNamesItsField) {
  custody::v1::KeydConfig c;
  auto expect_field = [&](const std::string& yaml, const std::string& field) {
    absl::Status st = Validate(yaml, &c);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << yaml;
    EXPECT_NE(st.message().find(field), absl::string_view::npos) << st << "\nwanted " << field;
  };
  std::string y = Yaml();
  expect_field(y.substr(y.find('\n') + 1), "'listen'");
  expect_field(Yaml() + "metrics: {listen: 0.0.0.0:9100}\n", "metrics.listen");
  expect_field(Yaml() + "limits: {max_message_bytes: 2000000}\n", "limits.max_message_bytes");
  expect_field(Yaml() + "policy: [{identity: a}, {identity: a}]\n", "policy[1].identity");
  std::string no_pin = Yaml();
  no_pin.replace(no_pin.find(dir_ + "/pin"), dir_.size() + 4, dir_ + "/nopin");
  expect_field(no_pin, "hsm.pin_file");
  std::string many = Yaml();
  many.replace(many.find("token_label: t"), 14, "token_label: t, sessions: 1000");
  expect_field(many, "hsm.sessions");
  std::string no_label = Yaml();
  no_label.replace(no_label.find("token_label: t, "), 16, "");
  expect_field(no_label, "hsm.token_label");
  std::string bad_listen = Yaml();
  bad_listen.replace(0, bad_listen.find('\n'), "listen: nowhere");
  expect_field(bad_listen, "'listen'");
  std::string no_tls = Yaml();
  const auto tls = no_tls.find("tls:");
  no_tls.erase(tls, no_tls.find('\n', tls) + 1 - tls);
  expect_field(no_tls, "'tls'");
}

TEST_F(ValidateTest, SecretsReadableByOthersAndMissingAuditFolderAreRefused) {
  custody::v1::KeydConfig c;
  ::chmod((dir_ + "/pin").c_str(), 0640);
  absl::Status st = Validate(Yaml(), &c);
  EXPECT_NE(st.message().find("'hsm.pin_file'"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("chmod 600"), absl::string_view::npos) << st;
  ::chmod((dir_ + "/pin").c_str(), 0600);
  ::chmod((dir_ + "/key").c_str(), 0644);
  EXPECT_NE(Validate(Yaml(), &c).message().find("'tls.key_file'"), absl::string_view::npos);
  ::chmod((dir_ + "/key").c_str(), 0600);
  std::string audit = Yaml();
  audit.replace(audit.find(dir_ + "/audit.log"), dir_.size() + 10, dir_ + "/no/such/audit.log");
  EXPECT_NE(Validate(audit, &c).message().find("'audit.path'"), absl::string_view::npos);
}

TEST_F(ValidateTest, SigningSocketIsAnotherAbsolutePath) {
  custody::v1::KeydConfig c;
  const std::string sock = "unix_socket: {path: /run/k.sock, identity: proxy";
  ASSERT_TRUE(Validate(Yaml(sock + ", signing_path: /run/k-sign.sock}\n"), &c).ok());
  EXPECT_EQ(c.unix_socket().signing_path(), "/run/k-sign.sock");
  for (const std::string& bad :
       std::vector<std::string>{"run/k-sign.sock", "/run/k.sock", "/" + std::string(120, 's')}) {
    const absl::Status st = Validate(Yaml(sock + ", signing_path: " + bad + "}\n"), &c);
    EXPECT_NE(st.message().find("unix_socket.signing_path"), absl::string_view::npos)
        << bad << ": " << st;
  }
}

TEST_F(ValidateTest, MetricsMayLeaveLoopbackOnlyWhenAllowed) {
  custody::v1::KeydConfig c;
  EXPECT_TRUE(
      Validate(Yaml("metrics: {listen: 0.0.0.0:9100, allow_non_loopback: true}\n"), &c).ok());
}

}  // namespace
}  // namespace custody::keyservice
