// SigningLane: one proxy worker's connection to keyd's signing socket (key_service.
// signing_socket; keyservice/signing_socket_protocol.h), served on the worker's own event loop.
// The worker's deferred signatures go out on it at the end of each loop turn (one write), and its
// answers are read when epoll reports them: no other thread is woken on the way, which is what
// the signing socket is for (docs/signing-transport.md).
//
// Failure handling, so that the lane never loses a signature that gRPC could still make:
//   - while it is down (keyd not running, not listening on the socket, or draining), TrySend
//     refuses and the batch goes over gRPC; it tries to connect again at most once a second;
//   - when it breaks (keyd stopped or closed it, a write failed, an answer did not parse), the
//     requests in flight on it go over gRPC with what is left of their deadlines;
//   - a request that keyd answers UNAVAILABLE (its HSM is down) is retried over gRPC, which may
//     reach another replica;
//   - a request whose deadline passes is answered DEADLINE_EXCEEDED, and the connection is
//     dropped (a keyd that hangs holds nothing for longer than one deadline).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "absl/time/time.h"
#include "common/unique_fd.h"
#include "keyservice/signing_socket_protocol.h"
#include "proxy/metrics.h"
#include "proxy/provider/key_signer.h"

namespace custody::proxy {

class SigningLane final : public provider::SignLane {
 public:
  // Requests in flight on one lane; beyond that, batches go over gRPC.
  static constexpr std::size_t kMaxPending = 1024;

  // SigningLane will connect to `path`; `epoll_fd` and `tag` are the worker's, for the socket's
  // events (edge-triggered), which go to OnEvent. `label` names the lane in logs ("worker 0");
  // `metrics` (outliving the lane) count what it does.
  SigningLane(std::string path, int epoll_fd, void* tag, std::string label,
              SigningSocketMetrics* metrics);
  // ~SigningLane answers requests still in flight CANCELLED.
  ~SigningLane() override;
  SigningLane(const SigningLane&) = delete;
  SigningLane& operator=(const SigningLane&) = delete;

  bool TrySend(Requests& requests, const std::shared_ptr<const Fallback>& fallback) override;
  // OnEvent handles the socket's epoll events.
  void OnEvent(uint32_t events);
  // Sweep expires requests whose deadline passed; the worker calls it from its timer sweep.
  void Sweep(absl::Time now);
  // Connect tries to connect now (if down and not tried within the last second).
  void Connect(absl::Time now);

  bool up() const { return fd_.valid(); }
  std::size_t pending() const { return pending_.size(); }

 private:
  struct Pending {
    keyservice::StreamSigner::Request request;
    std::shared_ptr<const Fallback> fallback;
  };

  void Flush();
  void ReadAnswers(bool hung_up);
  // Break drops the connection and sends what was in flight on it over gRPC.
  void Break(const std::string& why);
  void SendOver(std::unordered_map<uint64_t, Pending> requests, absl::Time now);
  void Count(prometheus::Counter* SigningSocketMetrics::*series, std::size_t n) const {
    (metrics_.*series)->Increment(static_cast<double>(n));
  }

  const std::string path_;
  const int epoll_fd_;
  void* const tag_;
  const std::string label_;
  const SigningSocketMetrics& metrics_;
  UniqueFd fd_;
  absl::Time retry_at_ = absl::InfinitePast();
  bool reported_down_ = false;  // "unreachable" is logged once until it is up again.
  std::string out_;             // Bytes not yet written.
  std::size_t out_sent_ = 0;    // Of out_.
  keyservice::FrameReader in_;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, Pending> pending_;
};

}  // namespace custody::proxy
