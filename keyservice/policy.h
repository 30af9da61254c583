// Policy: which caller identity may do what. Built once from the config; immutable, so it is
// shared by every request thread without locking.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "custody/v1/keyd_config.pb.h"

namespace custody::keyservice {

// GlobMatch says whether `name` matches `pattern`, where '*' stands for any run of characters
// (possibly empty) and every other character for itself.
bool GlobMatch(const std::string& pattern, const std::string& name);

class Policy {
 public:
  // Build validates the rules (identities present and unique, patterns non-empty).
  [[nodiscard]] static absl::StatusOr<Policy> Build(
      const google::protobuf::RepeatedPtrField<custody::v1::KeydPolicyRule>& rules);

  // MaySign / MayRead / IsAdmin: what `identity` may do. An identity without a rule may do
  // nothing. Thread-safe.
  bool MaySign(const std::string& identity, const std::string& key) const;
  bool MayRead(const std::string& identity, const std::string& key) const;
  bool IsAdmin(const std::string& identity) const;

 private:
  struct Grants {
    std::vector<std::string> sign;
    std::vector<std::string> read;
    bool admin = false;
  };
  std::map<std::string, Grants, std::less<>> grants_;
};

}  // namespace custody::keyservice
