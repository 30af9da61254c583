// custody-keyd: the key service. Flags, config, run; everything else lives in the library.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "absl/synchronization/mutex.h"
#include "common/log.h"
#include "common/malloc_tuning.h"
#include "common/signals.h"
#include "keyservice/config.h"
#include "keyservice/server.h"

int main(int argc, char** argv) {
  custody::TuneMallocOrReexec(argv);  // First: glibc reads its tunables at start only.
  custody::BlockTerminationSignals();
  // Debian's Abseil is built with lock-cycle detection on, which costs on every lock: off.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  CLI::App app{"custody-keyd: signs inside the HSM for custody proxies, over mutual TLS gRPC"};
  std::string config_path;
  std::string log_level = "info";
  bool check_only = false;
  custody::keyservice::KeydOptions options;
  app.add_option("-c,--config", config_path, "YAML (or JSON) configuration file")->required();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  app.add_flag("--check-config", check_only, "validate the configuration and exit");
  app.add_flag("--enable-test-hooks", options.enable_test_hooks,
               "serve custody.v1.KeyServiceTesting to admins (tests only; never in production)");
  CLI11_PARSE(app, argc, argv);

  if (absl::Status st = custody::InitLogging(log_level); !st.ok()) {
    std::fprintf(stderr, "custody-keyd: %s\n", st.ToString().c_str());
    return 2;
  }
  auto config = custody::keyservice::LoadKeydConfig(config_path);
  if (!config.ok()) {
    std::fprintf(stderr, "custody-keyd: invalid configuration: %s\n",
                 std::string(config.status().message()).c_str());
    return 2;
  }
  if (check_only) {
    std::printf("%s: configuration OK\n", config_path.c_str());
    return 0;
  }
  if (absl::Status st = custody::keyservice::RunKeyd(*config, options); !st.ok()) {
    spdlog::critical("custody-keyd: {}", st.ToString());
    return 1;
  }
  return 0;
}
