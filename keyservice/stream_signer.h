// StreamSigner: the client side of the signing path for busy callers. Signatures travel on
// long-lived SignStream calls ("lanes"), so gRPC's per-call cost (call set-up, headers,
// trailers, a call object on both sides) is paid once per stream, not once per signature or
// batch. Requests handed over together leave in one message; results come back as keyd signs
// them and are matched by id.
//
// Failure handling:
//   - each request has its own deadline: the signer answers DEADLINE_EXCEEDED when it passes,
//     and a stream that let a request expire is cancelled and replaced (a replica that hangs
//     without closing its connection holds nothing for longer than one deadline);
//   - a stream that ends (keyd stopped, connection lost, replica draining) fails the requests
//     it carried at once, UNAVAILABLE; the next request opens a new stream, which gRPC's
//     round-robin policy places on a ready replica;
//   - streams never wait for a connection (no wait_for_ready): with no key service, requests
//     fail fast instead of piling up.
#pragma once

#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "custody/v1/key_service.grpc.pb.h"

namespace custody::keyservice {

class StreamSigner {
 public:
  // Done receives one request's outcome, on the signer's completion thread: keep it short.
  using Done = std::function<void(const grpc::Status&, const custody::v1::SignResponse&)>;

  struct Request {
    custody::v1::SignRequest request;
    absl::Time deadline;
    Done done;
  };

  // StreamSigner signs over `channel` on `lanes` streams (at least 1), used in turn.
  StreamSigner(std::shared_ptr<grpc::Channel> channel, int lanes);
  // ~StreamSigner answers every request still waiting (CANCELLED), ends the streams and waits
  // for gRPC to let go of them.
  ~StreamSigner();
  StreamSigner(const StreamSigner&) = delete;
  StreamSigner& operator=(const StreamSigner&) = delete;

  // SignMany sends `requests` together (one message per 64) on the next lane; each `done` runs
  // exactly once, by its deadline at the latest (give or take the 50 ms expiry tick).
  // Thread-safe; never blocks on the network.
  void SignMany(std::vector<Request> requests);

 private:
  class Stream;
  struct Answer {
    Done done;
    grpc::Status status;
    custody::v1::SignResponse response;
  };

  // OpenLocked starts a new stream for lane `lane` (mu_ held).
  Stream* OpenLocked(std::size_t lane);
  // DetachLocked takes `s` off its lane (if still there), so the lane's next request opens a new
  // stream.
  void DetachLocked(Stream* s);
  // Poll handles completions and expires requests until the queue is shut down.
  void Poll();
  // StartTickLocked makes sure requests are checked against their deadlines (mu_ held).
  void StartTickLocked(absl::Time now);
  // ExpireLocked answers requests whose deadline has passed and cancels their streams.
  void ExpireLocked(absl::Time now, std::vector<Answer>& answers);
  static void Deliver(std::vector<Answer>& answers);

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<custody::v1::KeyService::Stub> stub_;

  std::mutex mu_;  // Guards what follows, and every Stream's state.
  std::condition_variable all_closed_;
  std::vector<Stream*> lanes_;    // The stream each lane sends on; null until needed.
  std::vector<Stream*> streams_;  // Every stream gRPC still holds (lanes' and retired ones).
  std::size_t next_lane_ = 0;
  uint64_t next_id_ = 1;
  absl::Time last_backoff_reset_ = absl::InfinitePast();  // Poller thread only.
  bool stopping_ = false;
  // The expiry tick runs only while requests wait, so an idle signer wakes nobody. A request
  // that finds it stopped starts it again through tick_alarm_ (a stream's first completion may
  // take as long as a connection attempt).
  bool ticking_ = false;
  bool alarm_set_ = false;  // tick_alarm_ is set and has not fired yet.
  grpc::Alarm tick_alarm_;
  char tick_tag_ = 0;  // tick_alarm_'s completion-queue tag (its address).

  grpc::CompletionQueue cq_;
  std::thread poller_;  // Last: starts once everything above exists.
};

}  // namespace custody::keyservice
