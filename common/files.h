// Small file helpers with errors that name the file.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace custody {

// ReadFile returns the whole content of `path`. NOT_FOUND or PERMISSION_DENIED name the file.
[[nodiscard]] absl::StatusOr<std::string> ReadFile(const std::string& path);

// ReadSecretFile reads a secret (a PIN) from `path`, dropping trailing white space. It refuses
// (FAILED_PRECONDITION) a file that group or others may read, or an empty one. The secret is
// never part of an error message.
[[nodiscard]] absl::StatusOr<std::string> ReadSecretFile(const std::string& path);

}  // namespace custody
