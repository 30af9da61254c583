// SigningSocket: keyd's signing socket (unix_socket.signing_path), serving the signing socket
// protocol (keyservice/signing_socket_protocol.h) to proxies on this host. Callers are admitted
// as on keyd's gRPC Unix socket (SO_PEERCRED against unix_socket.allowed_uids) and act as
// unix_socket.identity; each signature goes through KeyServiceImpl::SignStreamItem, so policy,
// input checks, deadlines, audit records and metrics are the SignStream call's.
//
// Threads: one accepts; each connection has one that reads requests and signs them itself when
// they are quick (KeyServiceImpl::QuickToSign: ECDSA in a local token), or hands them to the
// service's helper threads (one signing task per connection at a time, as SignStream does) and
// goes on reading. At most kMaxPending items per connection wait or are signed at once; beyond
// that the connection is not read, and the client's writes stall.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/unique_fd.h"
#include "custody/v1/keyd_config.pb.h"
#include "keyservice/audit_log.h"
#include "keyservice/key_service.h"
#include "keyservice/unix_listener.h"

namespace custody::keyservice {

class SigningSocket {
 public:
  // Connections served at once; more are closed at once, logged.
  static constexpr int kMaxConnections = 128;
  // Items read and not yet answered, per connection.
  static constexpr int kMaxPending = 256;

  // Open creates and listens on config.signing_path(). Messages over `max_message_bytes` close
  // the connection that sent them.
  static absl::StatusOr<std::unique_ptr<SigningSocket>> Open(
      const custody::v1::KeydUnixSocketConfig& config, KeyServiceImpl& service, AuditLog& audit,
      std::size_t max_message_bytes);
  ~SigningSocket();
  SigningSocket(const SigningSocket&) = delete;
  SigningSocket& operator=(const SigningSocket&) = delete;

  // Start accepts connections on a thread.
  void Start();
  // Stop stops accepting and removes the socket file; every connection stops reading, answers
  // what it read, and closes (its client moves to gRPC). Returns once all have closed.
  // Idempotent.
  void Stop();

 private:
  class Connection;

  SigningSocket(const custody::v1::KeydUnixSocketConfig& config, KeyServiceImpl& service,
                AuditLog& audit, std::size_t max_message_bytes, UniqueFd fd);
  void OnConnection(UniqueFd fd);

  const std::string path_;
  const std::string identity_;
  const UnixPeers peers_;
  KeyServiceImpl& service_;
  AuditLog& audit_;
  const std::size_t max_message_bytes_;
  UniqueFd fd_;
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;

  std::mutex mu_;  // Guards what follows.
  std::condition_variable all_closed_;
  std::set<int> open_;  // Sockets of the connections being served.
};

}  // namespace custody::keyservice
