#include "keyservice/unix_listener.h"

#include <errno.h>
#include <grpcpp/server_posix.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status.h"

namespace custody::keyservice {
absl::StatusOr<UniqueFd> ListenUnix(const std::string& field, const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": too long: ", path));
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat(field, ": ", path, " exists and is not a socket"));
    }
    ::unlink(path.c_str());  // A socket left by an earlier keyd.
  }
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) {
    return absl::InternalError(absl::StrCat("unix socket: ", std::strerror(errno)));
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  // Created 0660 from the start (no window in which others could connect).
  const mode_t old_mask = ::umask(0117);
  const int bound = ::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  const int bind_errno = errno;
  ::umask(old_mask);
  if (bound != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": cannot bind ", path, ": ", std::strerror(bind_errno)));
  }
  if (::listen(fd.get(), SOMAXCONN) != 0) {
    return absl::InternalError(absl::StrCat("listen on ", path, ": ", std::strerror(errno)));
  }
  return fd;
}

UnixPeers::UnixPeers(const custody::v1::KeydUnixSocketConfig& config, AuditLog& audit)
    : allowed_uids_(config.allowed_uids().begin(), config.allowed_uids().end()), audit_(audit) {
  if (allowed_uids_.empty()) {
    allowed_uids_.insert(static_cast<uint32_t>(::geteuid()));
  }
}

std::optional<std::string> UnixPeers::Admit(int fd, const std::string& path) const {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    spdlog::error("unix socket {}: SO_PEERCRED: {}; connection closed", path, std::strerror(errno));
    return std::nullopt;
  }
  std::string peer = absl::StrCat("unix:", path, " pid=", cred.pid, " uid=", cred.uid);
  if (allowed_uids_.count(cred.uid) == 0) {
    AuditRecord record{"", peer, "connect"};
    record.outcome = "PERMISSION_DENIED";
    record.detail = absl::StrCat("uid ", cred.uid, " is not in unix_socket.allowed_uids");
    (void)audit_.Append(record);
    spdlog::warn("unix socket: refused {}: {}", peer, record.detail);
    return std::nullopt;
  }
  return peer;
}

absl::StatusOr<std::unique_ptr<UnixListener>> UnixListener::Open(
    const custody::v1::KeydUnixSocketConfig& config, AuditLog& audit) {
  CUSTODY_ASSIGN_OR_RETURN(UniqueFd fd, ListenUnix("unix_socket.path", config.path()));
  return std::unique_ptr<UnixListener>(new UnixListener(config, audit, std::move(fd)));
}

UnixListener::UnixListener(const custody::v1::KeydUnixSocketConfig& config, AuditLog& audit,
                           UniqueFd fd)
    : path_(config.path()),
      identity_(config.identity()),
      peers_(config, audit),
      fd_(std::move(fd)) {}

UnixListener::~UnixListener() { Stop(); }

void UnixListener::Start(grpc::Server* server) {
  thread_ = std::thread([this, server] { Accept(server); });
}

void UnixListener::Stop() {
  if (stopping_.exchange(true)) {
    return;
  }
  ::shutdown(fd_.get(), SHUT_RDWR);  // Wakes the blocked accept().
  if (thread_.joinable()) {
    thread_.join();
  }
  ::unlink(path_.c_str());
}

void AcceptUnix(int listen_fd, const std::string& path, const std::atomic<bool>& stopping,
                const std::function<void(UniqueFd)>& on_connection) {
  while (!stopping.load()) {
    const int raw = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (raw >= 0) {
      on_connection(UniqueFd(raw));
      continue;
    }
    if (errno == EINTR || errno == ECONNABORTED) {
      continue;
    }
    if (stopping.load()) {
      return;
    }
    spdlog::error("unix socket {}: accept: {}", path, std::strerror(errno));
    if (errno != EMFILE && errno != ENFILE && errno != ENOBUFS && errno != ENOMEM) {
      return;
    }
    ::usleep(100 * 1000);  // Out of descriptors or memory: back off, then try again.
  }
}

void UnixListener::Accept(grpc::Server* server) {
  AcceptUnix(fd_.get(), path_, stopping_, [&](UniqueFd conn) {
    const std::optional<std::string> peer = peers_.Admit(conn.get(), path_);
    if (!peer.has_value()) {
      return;
    }
    spdlog::info("unix socket: {} connected as '{}'", *peer, identity_);
    grpc::AddInsecureChannelFromFd(server, conn.Release());
  });
}

}  // namespace custody::keyservice
