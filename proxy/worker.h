// Worker: one event loop (epoll) on its own thread, with its own listening sockets
// (SO_REUSEPORT), owning every connection it accepts. Handshakes run in OpenSSL ASYNC jobs: a
// handshake waiting for its signature pauses on the connection's wait fd while the loop serves
// every other connection. After the handshake, the relay moves bytes both ways with bounded
// buffers (read only while there is room: backpressure), passes half-closes through, and
// enforces the handshake, connect and idle timeouts.
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "common/unique_fd.h"
#include "custody/v1/proxy_config.pb.h"
#include "proxy/config.h"
#include "proxy/metrics.h"
#include "proxy/proxy_protocol.h"
#include "proxy/signing_lane.h"
#include "proxy/tls_context.h"

namespace custody::proxy {

// ListenerRuntime is what a worker needs to serve one listener.
struct ListenerRuntime {
  std::string name;
  std::shared_ptr<const ListenerTls> tls;
  BackendAddress backend;
  std::string backend_address;      // As configured, for logs.
  sockaddr_storage backend_addr{};  // Resolved when the state was built.
  socklen_t backend_addr_len = 0;
  int64_t connect_timeout_ms = 0;
  ProxyProtocol proxy_protocol = ProxyProtocol::kOff;  // Header sent to the backend first.
  ListenerMetrics* metrics = nullptr;
};

// ProxyState is the served configuration, immutable; a reload publishes a new one. Connections
// keep the state they were accepted under until they close.
struct ProxyState {
  std::vector<ListenerRuntime> listeners;  // In the config's order (reloads keep it).
  custody::v1::ProxyLimits limits;
  uint64_t generation = 0;
};

class Worker {
 public:
  // Worker serves `listen_fds` (one per listener, in order; bound and listening). With a
  // `signing_socket` (keyd's, on this host), its handshake signatures go there first (see
  // SigningLane).
  Worker(int index, std::vector<UniqueFd> listen_fds, std::shared_ptr<const ProxyState> state,
         ProxyMetrics* metrics, std::string signing_socket);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Init makes the epoll and control descriptors. Call once before Run.
  [[nodiscard]] absl::Status Init();

  // Run serves until Drain's deadline has passed or every connection has closed after Drain.
  void Run();

  // SetState publishes a new configuration for new connections. Thread-safe.
  void SetState(std::shared_ptr<const ProxyState> state);

  // Drain stops accepting; open connections get until `deadline_ms` (CLOCK_MONOTONIC) to finish,
  // then are closed. Thread-safe.
  void Drain(int64_t deadline_ms);

  struct Connection;
  struct Watch;

  // NotifyReady queues connection `id` for its paused handshake to be resumed (the answer to its
  // signature came) and wakes the loop. Thread-safe: called through OpenSSL's async callback on
  // the key client's thread, or on the loop's own thread when its signing lane read the answer
  // (then queued for later in the same loop turn, with no wake-up).
  void NotifyReady(uint64_t id);

 private:
  void OnControl();
  // OnReady resumes the paused handshakes queued by NotifyReady from other threads.
  void OnReady();
  // Resume resumes the paused handshakes of connections `ids` (those still open).
  void Resume(const std::vector<uint64_t>& ids);
  // ResumeLocal resumes those queued by NotifyReady on the loop's own thread.
  void ResumeLocal();
  void OnAccept(size_t listener);
  // OnConnectionEvent routes an event (or a signature's answer, as kAsync) of a connection's
  // watch: an abandoned connection only finishes its job; a closed one takes nothing more.
  void OnConnectionEvent(Watch* watch, uint32_t events);
  void OnEvent(Watch* watch, uint32_t events);
  void Handshake(Connection& c);
  void StartBackend(Connection& c);
  void OnBackendConnected(Connection& c);
  // Pump returns whether any bytes or ends moved.
  bool Pump(Connection& c);
  void SyncAsyncFds(Connection& c);
  void Close(Connection& c, CloseReason reason, const std::string& why);
  void FailHandshake(Connection& c, HandshakeOutcome outcome, const std::string& why);
  void Free(Connection& c);
  void Sweep(int64_t now_ms);
  void SetAccepting(bool on);
  bool AtLimit() const;
  // Register adds a connection socket to epoll (edge-triggered, both directions).
  bool Register(int fd, Watch* watch);

  const int index_;
  std::vector<UniqueFd> listen_fds_;
  std::vector<std::unique_ptr<Watch>> listen_watches_;
  std::shared_ptr<const ProxyState> state_;  // The loop's copy.
  ProxyMetrics* metrics_;
  UniqueFd epoll_;
  UniqueFd control_;  // eventfd: SetState / Drain wake the loop.
  std::unique_ptr<Watch> control_watch_;
  // One eventfd for every paused handshake of this worker: signatures answered are queued by
  // id (not pointer: a connection may be gone by the time its entry is read).
  UniqueFd ready_;
  std::unique_ptr<Watch> ready_watch_;
  std::mutex ready_mu_;  // Guards the two below.
  std::vector<uint64_t> ready_ids_;
  bool ready_signaled_ = false;
  std::vector<uint64_t> local_ready_ids_;            // Queued on the loop's own thread (loop only).
  std::unordered_map<uint64_t, Connection*> by_id_;  // Open connections (loop thread only).
  const std::string signing_socket_;
  std::unique_ptr<Watch> lane_watch_;
  std::unique_ptr<SigningLane> lane_;  // With a signing socket; loop thread only.

  std::mutex mu_;  // Guards the two below (written by other threads).
  std::shared_ptr<const ProxyState> pending_state_;
  int64_t pending_drain_ms_ = -1;

  bool accepting_ = true;
  int64_t accept_backoff_until_ms_ = 0;  // After EMFILE and the like.
  bool draining_ = false;
  int64_t drain_deadline_ms_ = 0;
  int handshakes_ = 0;  // Connections in the handshake (paused ones included).
  std::vector<std::unique_ptr<Connection>> connections_;  // Unordered; index in Connection.
  std::vector<Connection*> to_free_;                      // Closed during this loop turn.
  std::deque<Connection*> to_pump_;  // Busy relays: they used up a turn with bytes left.
};

// NowMs is CLOCK_MONOTONIC in milliseconds.
int64_t NowMs();

}  // namespace custody::proxy
