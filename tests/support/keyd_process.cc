#include "tests/support/keyd_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "keyservice/client.h"

namespace custody::testing {

absl::Status WaitForHealthy(const std::string& identity, absl::Duration timeout) {
  auto settings = keyservice::SettingsForIdentity({}, identity);
  if (!settings.ok()) {
    return settings.status();
  }
  auto channel = keyservice::MakeChannel(*settings);
  if (!channel.ok()) {
    return channel.status();
  }
  auto stub = grpc::health::v1::Health::NewStub(*channel);
  const absl::Time deadline = absl::Now() + timeout;
  std::string last;
  while (absl::Now() < deadline) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
    ctx.set_wait_for_ready(false);
    grpc::health::v1::HealthCheckResponse resp;
    grpc::Status st = stub->Check(&ctx, {}, &resp);
    if (st.ok() && resp.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
      return absl::OkStatus();
    }
    last = st.error_message();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // Poll interval, not a wait.
  }
  return absl::DeadlineExceededError(absl::StrCat("key service not healthy: ", last));
}

absl::StatusOr<std::unique_ptr<KeydProcess>> KeydProcess::Start(
    const std::vector<std::string>& args, const std::string& log_path,
    absl::Duration ready_timeout) {
  const std::string binary = absl::StrCat(CUSTODY_BIN_DIR, "/custody-keyd");
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    return absl::InternalError("fork failed");
  }
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) {
      ::_exit(127);
    }
    const int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(binary.c_str()));
    for (const std::string& a : args) {
      argv.push_back(const_cast<char*>(a.c_str()));
    }
    argv.push_back(nullptr);
    ::execv(binary.c_str(), argv.data());
    ::_exit(127);
  }
  std::unique_ptr<KeydProcess> proc(new KeydProcess(pid, log_path));
  const absl::Time deadline = absl::Now() + ready_timeout;
  while (absl::Now() < deadline) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      proc->stopped_ = true;
      return absl::FailedPreconditionError(
          absl::StrCat("custody-keyd exited at start:\n", proc->Log()));
    }
    if (WaitForHealthy("admin", absl::Milliseconds(500)).ok()) {
      return proc;
    }
  }
  return absl::DeadlineExceededError(
      absl::StrCat("custody-keyd did not become healthy:\n", proc->Log()));
}

int KeydProcess::Stop(absl::Duration timeout) {
  if (stopped_) {
    return exit_status_;
  }
  ::kill(pid_, SIGTERM);
  const absl::Time deadline = absl::Now() + timeout;
  int status = 0;
  while (::waitpid(pid_, &status, WNOHANG) != pid_) {
    if (absl::Now() > deadline) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  stopped_ = true;
  exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  return exit_status_;
}

KeydProcess::~KeydProcess() { Stop(); }

std::string KeydProcess::Log() const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace custody::testing
