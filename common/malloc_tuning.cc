#include "common/malloc_tuning.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace custody {

std::optional<std::string> TunedMallocEnv(const char* current) {
  const std::string tunable = absl::StrCat("glibc.malloc.tcache_count=", kMallocTcacheCount);
  if (current == nullptr || *current == '\0') {
    return tunable;
  }
  if (absl::StrContains(current, "glibc.malloc.tcache_count=")) {
    return std::nullopt;
  }
  return absl::StrCat(current, ":", tunable);
}

void TuneMallocOrReexec(char** argv) {
  const std::optional<std::string> tunables = TunedMallocEnv(std::getenv("GLIBC_TUNABLES"));
  if (!tunables.has_value()) {
    return;
  }
  if (::setenv("GLIBC_TUNABLES", tunables->c_str(), 1) != 0) {
    return;
  }
  ::execv("/proc/self/exe", argv);
  // Still here: run on untuned (the variable stays set, so a child would not try again).
  std::fprintf(stderr,
               "%s: cannot re-execute with GLIBC_TUNABLES=%s (%s); glibc's malloc "
               "defaults apply\n",
               argv[0], tunables->c_str(), std::strerror(errno));
}

}  // namespace custody
