#include "common/yaml_proto.h"

#include <gtest/gtest.h>

#include "custody/v1/keyd_config.pb.h"

namespace custody {
namespace {

using custody::v1::KeydConfig;

absl::Status Parse(const std::string& yaml, KeydConfig* out) {
  return ParseYamlToProto(yaml, "test.yaml", out);
}

TEST(YamlProtoTest, FillsNestedAndRepeatedFields) {
  KeydConfig c;
  ASSERT_TRUE(Parse(R"(
listen: "127.0.0.1:7443"
hsm:
  module: /usr/lib/x.so
  sessions: 12
policy:
  - identity: proxy
    sign: ["a-*", b]
    admin: false
  - identity: admin
    admin: true
)",
                    &c)
                  .ok());
  EXPECT_EQ(c.listen(), "127.0.0.1:7443");
  EXPECT_EQ(c.hsm().sessions(), 12u);
  ASSERT_EQ(c.policy_size(), 2);
  EXPECT_EQ(c.policy(0).sign(1), "b");
  EXPECT_TRUE(c.policy(1).admin());
}

TEST(YamlProtoTest, UnknownFieldIsNamedWithItsPathAndLine) {
  KeydConfig c;
  absl::Status st = Parse("listen: x\ntls:\n  cert_fil: a\n", &c);
  ASSERT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("test.yaml:3"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("'tls.cert_fil'"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("cert_file"), absl::string_view::npos) << st;  // Known fields.
}

TEST(YamlProtoTest, WrongTypesAreRefused) {
  KeydConfig c;
  EXPECT_NE(Parse("hsm:\n  sessions: many\n", &c).message().find("hsm.sessions"),
            absl::string_view::npos);
  EXPECT_NE(Parse("hsm:\n  sessions: -1\n", &c).message().find("hsm.sessions"),
            absl::string_view::npos);
  EXPECT_NE(Parse("policy:\n  - identity: a\n    admin: yes\n", &c).message().find("admin"),
            absl::string_view::npos);
  EXPECT_NE(Parse("policy:\n  - identity: a\n    admin: \"true\"\n", &c).message().find("admin"),
            absl::string_view::npos);
  EXPECT_NE(Parse("tls: [1, 2]\n", &c).message().find("'tls'"), absl::string_view::npos);
  EXPECT_NE(Parse("policy: {identity: a}\n", &c).message().find("list"), absl::string_view::npos);
  EXPECT_NE(Parse("listen: [a]\n", &c).message().find("single value"), absl::string_view::npos);
  EXPECT_NE(Parse("listen:\n", &c).message().find("value is required"), absl::string_view::npos);
}

TEST(YamlProtoTest, AFieldGivenTwiceIsRefused) {
  KeydConfig c;
  absl::Status st = Parse("hsm:\n  sessions: 8\n  sessions: 9\n", &c);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("'hsm.sessions': given twice"), absl::string_view::npos) << st;
  EXPECT_FALSE(Parse("policy: []\npolicy: []\n", &c).ok());
}

TEST(YamlProtoTest, JsonIsAccepted) {
  KeydConfig c;
  ASSERT_TRUE(
      Parse(R"({"listen": "[::1]:1", "hsm": {"sessions": 3}, "policy": [{"identity": "p"}]})", &c)
          .ok());
  EXPECT_EQ(c.listen(), "[::1]:1");
  EXPECT_EQ(c.hsm().sessions(), 3u);
}

TEST(YamlProtoTest, InvalidYamlNamesTheLine) {
  KeydConfig c;
  absl::Status st = Parse("listen: [a, b\ntls: {\n", &c);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("not valid YAML"), absl::string_view::npos) << st;
}

TEST(YamlProtoTest, EmptyDocumentGivesDefaults) {
  KeydConfig c;
  c.set_listen("old");
  EXPECT_TRUE(Parse("", &c).ok());
  EXPECT_EQ(c.listen(), "");
}

}  // namespace
}  // namespace custody
