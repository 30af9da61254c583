#include "common/files.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace custody {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    const std::string msg = absl::StrCat("cannot read ", path, ": ", std::strerror(err));
    if (err == ENOENT) {
      return absl::NotFoundError(msg);
    }
    if (err == EACCES) {
      return absl::PermissionDeniedError(msg);
    }
    return absl::FailedPreconditionError(msg);
  }
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

absl::StatusOr<std::string> ReadSecretFile(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("cannot stat ", path, ": ", std::strerror(errno)));
  }
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, " is accessible by group or others; restrict it with: chmod 600 ", path));
  }
  auto content = ReadFile(path);
  if (!content.ok()) {
    return content.status();
  }
  std::string secret(absl::StripTrailingAsciiWhitespace(*content));
  if (secret.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(path, " is empty"));
  }
  return secret;
}

}  // namespace custody
