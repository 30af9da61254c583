#include "keyservice/policy.h"

#include "absl/strings/str_cat.h"

namespace custody::keyservice {

bool GlobMatch(const std::string& pattern, const std::string& name) {
  // Iterative wildcard match with one backtrack point: linear in practice, no recursion.
  std::size_t p = 0, n = 0, star = std::string::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (p < pattern.size() && pattern[p] == name[n]) {
      ++p;
      ++n;
    } else if (star != std::string::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') {
    ++p;
  }
  return p == pattern.size();
}

absl::StatusOr<Policy> Policy::Build(
    const google::protobuf::RepeatedPtrField<custody::v1::KeydPolicyRule>& rules) {
  Policy policy;
  for (int i = 0; i < rules.size(); ++i) {
    const auto& rule = rules[i];
    const std::string where = absl::StrCat("field 'policy[", i, "]");
    if (rule.identity().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ".identity': required (the CN of the caller's certificate)"));
    }
    if (policy.grants_.count(rule.identity()) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ".identity': '", rule.identity(),
                                                     "' has another rule; merge them into one"));
    }
    Grants g;
    for (const auto& list : {&rule.sign(), &rule.read()}) {
      for (const std::string& pattern : *list) {
        if (pattern.empty()) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, "': empty key pattern; use \"*\" for every key"));
        }
      }
    }
    g.sign.assign(rule.sign().begin(), rule.sign().end());
    g.read.assign(rule.read().begin(), rule.read().end());
    g.admin = rule.admin();
    policy.grants_.emplace(rule.identity(), std::move(g));
  }
  return policy;
}

namespace {

bool AnyMatches(const std::vector<std::string>& patterns, const std::string& key) {
  for (const std::string& p : patterns) {
    if (GlobMatch(p, key)) {
      return true;
    }
  }
  return false;
}

}  // namespace

bool Policy::MaySign(const std::string& identity, const std::string& key) const {
  auto it = grants_.find(identity);
  return it != grants_.end() && AnyMatches(it->second.sign, key);
}

bool Policy::MayRead(const std::string& identity, const std::string& key) const {
  auto it = grants_.find(identity);
  return it != grants_.end() &&
         (AnyMatches(it->second.sign, key) || AnyMatches(it->second.read, key));
}

bool Policy::IsAdmin(const std::string& identity) const {
  auto it = grants_.find(identity);
  return it != grants_.end() && it->second.admin;
}

}  // namespace custody::keyservice
