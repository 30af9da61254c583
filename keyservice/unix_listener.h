// UnixListener: keyd's Unix socket for callers on the same host (see KeydUnixSocketConfig). It
// accepts connections itself, checks the caller's uid as the kernel reports it (SO_PEERCRED)
// and hands allowed connections to the gRPC server, where CallerOf makes every call on them as
// the socket's identity. Refused connections are logged and audited.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/unique_fd.h"
#include "custody/v1/keyd_config.pb.h"
#include "keyservice/audit_log.h"

namespace custody::keyservice {

// ListenUnix creates a Unix socket at `path` (mode 0660 from the start; a stale socket file there
// is replaced, never another kind of file) and listens on it. Errors name the config `field`.
absl::StatusOr<UniqueFd> ListenUnix(const std::string& field, const std::string& path);

// UnixPeers admits connections on a keyd Unix socket by the caller's uid, as the kernel reports
// it (SO_PEERCRED), against unix_socket.allowed_uids (empty: keyd's own uid).
class UnixPeers {
 public:
  UnixPeers(const custody::v1::KeydUnixSocketConfig& config, AuditLog& audit);
  // Admit returns the peer's label ("unix:PATH pid=P uid=U") when `fd`'s caller may connect to
  // the socket at `path`; otherwise it logs and audits the refusal (action "connect") and returns
  // nothing.
  std::optional<std::string> Admit(int fd, const std::string& path) const;

 private:
  std::set<uint32_t> allowed_uids_;
  AuditLog& audit_;
};

// AcceptUnix accepts connections on `listen_fd` (non-blocking, close-on-exec) and hands each to
// `on_connection` until `stopping` is set and the socket is shut down (which wakes the accept),
// or accept fails for good (logged). Out of descriptors or memory, it waits 100 ms and goes on.
void AcceptUnix(int listen_fd, const std::string& path, const std::atomic<bool>& stopping,
                const std::function<void(UniqueFd)>& on_connection);

class UnixListener {
 public:
  // Open creates and listens on the socket (replacing a stale socket file, never another kind
  // of file). The socket is mode 0660.
  static absl::StatusOr<std::unique_ptr<UnixListener>> Open(
      const custody::v1::KeydUnixSocketConfig& config, AuditLog& audit);
  ~UnixListener();
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;

  // Start accepts connections for `server` (started, outliving this listener) on a thread.
  void Start(grpc::Server* server);
  // Stop stops accepting and removes the socket file; connections already handed over stay
  // with the server. Idempotent.
  void Stop();

 private:
  UnixListener(const custody::v1::KeydUnixSocketConfig& config, AuditLog& audit, UniqueFd fd);
  void Accept(grpc::Server* server);

  const std::string path_;
  const std::string identity_;
  const UnixPeers peers_;
  UniqueFd fd_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace custody::keyservice
