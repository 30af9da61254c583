#include "keyservice/policy.h"

#include <gtest/gtest.h>

namespace custody::keyservice {
namespace {

TEST(GlobMatchTest, StarMatchesAnyRun) {
  EXPECT_TRUE(GlobMatch("lab-*", "lab-ec256"));
  EXPECT_TRUE(GlobMatch("lab-*", "lab-"));
  EXPECT_FALSE(GlobMatch("lab-*", "lab"));
  EXPECT_TRUE(GlobMatch("*", ""));
  EXPECT_TRUE(GlobMatch("*-ec*", "lab-ec256"));
  EXPECT_TRUE(GlobMatch("a*b*c", "aXXbYYc"));
  EXPECT_FALSE(GlobMatch("a*b*c", "aXXbYY"));
  EXPECT_TRUE(GlobMatch("exact", "exact"));
  EXPECT_FALSE(GlobMatch("exact", "exact2"));
  EXPECT_FALSE(GlobMatch("", "x"));
  // Pathological patterns stay fast (no exponential backtracking).
  EXPECT_FALSE(GlobMatch("*a*a*a*a*a*a*a*a*b", std::string(5000, 'a')));
}

custody::v1::KeydConfig Rules() {
  custody::v1::KeydConfig c;
  auto* proxy = c.add_policy();
  proxy->set_identity("proxy");
  proxy->add_sign("web-*");
  auto* reader = c.add_policy();
  reader->set_identity("auditor");
  reader->add_read("*");
  auto* admin = c.add_policy();
  admin->set_identity("admin");
  admin->set_admin(true);
  c.add_policy()->set_identity("intruder");
  return c;
}

TEST(PolicyTest, GrantsAreWhatTheRulesSay) {
  auto policy = Policy::Build(Rules().policy());
  ASSERT_TRUE(policy.ok()) << policy.status();
  EXPECT_TRUE(policy->MaySign("proxy", "web-frontend"));
  EXPECT_FALSE(policy->MaySign("proxy", "ca"));
  EXPECT_TRUE(policy->MayRead("proxy", "web-frontend"));  // Signing implies reading.
  EXPECT_FALSE(policy->MayRead("proxy", "ca"));
  EXPECT_TRUE(policy->MayRead("auditor", "ca"));
  EXPECT_FALSE(policy->MaySign("auditor", "ca"));
  EXPECT_TRUE(policy->IsAdmin("admin"));
  EXPECT_FALSE(policy->IsAdmin("proxy"));
  EXPECT_FALSE(policy->MaySign("admin", "web-frontend"));
  for (const char* who : {"intruder", "stranger", ""}) {
    EXPECT_FALSE(policy->MaySign(who, "web-frontend"));
    EXPECT_FALSE(policy->MayRead(who, "web-frontend"));
    EXPECT_FALSE(policy->IsAdmin(who));
  }
}

TEST(PolicyTest, DuplicateOrMissingIdentitiesAreRefused) {
  auto c = Rules();
  c.add_policy()->set_identity("proxy");
  auto dup = Policy::Build(c.policy());
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(dup.status().message().find("policy[4].identity"), absl::string_view::npos);

  custody::v1::KeydConfig empty_id;
  empty_id.add_policy()->add_sign("x");
  EXPECT_EQ(Policy::Build(empty_id.policy()).status().code(), absl::StatusCode::kInvalidArgument);

  custody::v1::KeydConfig empty_pattern;
  auto* r = empty_pattern.add_policy();
  r->set_identity("p");
  r->add_sign("");
  EXPECT_EQ(Policy::Build(empty_pattern.policy()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace custody::keyservice
