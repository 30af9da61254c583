// custody-proxy: TLS termination whose handshake signatures are made in the HSM, behind the key
// service. Flags, config, run; everything else lives in the library.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "absl/synchronization/mutex.h"
#include "common/log.h"
#include "common/malloc_tuning.h"
#include "proxy/config.h"
#include "proxy/server.h"

int main(int argc, char** argv) {
  custody::TuneMallocOrReexec(argv);  // First: glibc reads its tunables at start only.
  custody::proxy::BlockProxySignals();
  // Debian's Abseil is built with lock-cycle detection on, which costs on every lock: off.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  CLI::App app{
      "custody-proxy: terminates TLS with keys that never leave the HSM (signatures are made "
      "by custody-keyd) and relays plaintext to a backend"};
  std::string config_path;
  std::string log_level = "info";
  bool check_only = false;
  app.add_option("-c,--config", config_path, "YAML (or JSON) configuration file")->required();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  app.add_flag("--check-config", check_only,
               "validate the configuration (files and TLS settings, not the key service) and "
               "exit");
  CLI11_PARSE(app, argc, argv);

  if (absl::Status st = custody::InitLogging(log_level); !st.ok()) {
    std::fprintf(stderr, "custody-proxy: %s\n", st.ToString().c_str());
    return 2;
  }
  auto config = custody::proxy::LoadProxyConfig(config_path);
  if (!config.ok()) {
    std::fprintf(stderr, "custody-proxy: invalid configuration: %s\n",
                 std::string(config.status().message()).c_str());
    return 2;
  }
  if (check_only) {
    std::printf("%s: configuration OK\n", config_path.c_str());
    return 0;
  }
  if (absl::Status st = custody::proxy::RunProxy(*config, config_path); !st.ok()) {
    spdlog::critical("custody-proxy: {}", st.ToString());
    return 1;
  }
  return 0;
}
