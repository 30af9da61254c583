// UnixListener: keyd's Unix socket for callers on the same host (see KeydUnixSocketConfig). It
// accepts connections itself, checks the caller's uid as the kernel reports it (SO_PEERCRED)
// and hands allowed connections to the gRPC server, where CallerOf makes every call on them as
// the socket's identity. Refused connections are logged and audited.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/unique_fd.h"
#include "custody/v1/keyd_config.pb.h"
#include "keyservice/audit_log.h"

namespace custody::keyservice {

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
  std::set<uint32_t> allowed_uids_;
  AuditLog& audit_;
  UniqueFd fd_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace custody::keyservice
