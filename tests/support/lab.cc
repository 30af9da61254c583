#include "tests/support/lab.h"

#include <sys/stat.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace custody::testing {

int RunCommand(const std::string& command, std::string* output) {
  FILE* pipe = ::popen(absl::StrCat(command, " 2>&1").c_str(), "r");
  if (pipe == nullptr) {
    return -1;
  }
  std::string out;
  char buf[4096];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) {
    out.append(buf, n);
  }
  const int status = ::pclose(pipe);
  if (output != nullptr) {
    *output = std::move(out);
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

void WriteFile(const std::string& path, const std::string& content, int mode) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << content;
  ::chmod(path.c_str(), static_cast<mode_t>(mode));
}

absl::StatusOr<std::unique_ptr<Lab>> Lab::Create() {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/custody-test-XXXXXX");
  if (::mkdtemp(templ.data()) == nullptr) {
    return absl::InternalError("mkdtemp failed");
  }
  std::unique_ptr<Lab> lab(new Lab(templ));
  std::string out;
  const int rc =
      RunCommand(absl::StrCat(CUSTODY_SOURCE_DIR, "/hsm/lab.sh init '", lab->dir_, "'"), &out);
  if (rc != 0) {
    return absl::InternalError(absl::StrCat("hsm/lab.sh init failed (", rc, "):\n", out));
  }
  std::ifstream in(lab->Path("lab.env"));
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view rest(line);
    if (!absl::ConsumePrefix(&rest, "export ")) {
      continue;
    }
    std::pair<std::string, std::string> kv = absl::StrSplit(rest, absl::MaxSplits('=', 1));
    std::string value = kv.second;
    if (value.size() >= 2 && value.front() == '\'' && value.back() == '\'') {
      value = value.substr(1, value.size() - 2);
    }
    lab->env_[kv.first] = value;
    ::setenv(kv.first.c_str(), value.c_str(), 1);
  }
  if (lab->env_.count("CUSTODY_KEYD_ADDR") == 0) {
    return absl::InternalError("lab.env has no CUSTODY_KEYD_ADDR");
  }
  return lab;
}

Lab::~Lab() {
  if (std::getenv("CUSTODY_KEEP_LAB") == nullptr) {
    RunCommand(absl::StrCat("rm -rf '", root_, "'"));
  }
}

std::string Lab::Env(const std::string& name) const {
  auto it = env_.find(name);
  return it == env_.end() ? "" : it->second;
}

}  // namespace custody::testing
