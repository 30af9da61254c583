// Lab: a fresh SoftHSM2 lab (hsm/lab.sh init) in a temporary directory, for integration tests.
// Its lab.env variables are read into a map and exported into this process's environment, so
// clients built from SettingsForIdentity find them. The directory is removed on destruction.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace custody::testing {

class Lab {
 public:
  // Create runs hsm/lab.sh init in a new temporary directory.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Lab>> Create();
  ~Lab();

  const std::string& dir() const { return dir_; }
  // Env returns a lab.env variable ("" if unset).
  std::string Env(const std::string& name) const;
  // Path is dir()/relative.
  std::string Path(const std::string& relative) const { return dir_ + "/" + relative; }

 private:
  explicit Lab(std::string root) : root_(std::move(root)), dir_(root_ + "/lab") {}
  std::string root_;
  std::string dir_;
  std::map<std::string, std::string> env_;
};

// RunCommand runs `command` with /bin/sh and returns its exit status; output goes to `output`
// (stdout and stderr together) when given.
int RunCommand(const std::string& command, std::string* output = nullptr);

// WriteFile writes `content` to `path` with `mode`.
void WriteFile(const std::string& path, const std::string& content, int mode = 0600);

}  // namespace custody::testing
