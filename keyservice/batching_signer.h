// BatchingSigner: the client side of the signing path for busy callers. A request goes out at
// once while fewer than `max_in_flight` calls are outstanding; requests that arrive while every
// call is busy wait and leave together in the next SignBatch call (up to 64). An idle caller
// thus sees no added delay, and a busy one pays gRPC's per-call cost once for many signatures
// (natural batching, as a database commits a group of transactions at once).
#pragma once

#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "custody/v1/key_service.grpc.pb.h"

namespace custody::keyservice {

class BatchingSigner {
 public:
  // Done receives one request's outcome, on the signer's completion thread: keep it short.
  using Done = std::function<void(const grpc::Status&, const custody::v1::SignResponse&)>;

  // BatchingSigner spreads calls over `channels` in turn, with at most `max_in_flight` calls
  // outstanding and `deadline` per call.
  BatchingSigner(std::vector<std::shared_ptr<grpc::Channel>> channels, int max_in_flight,
                 absl::Duration deadline);
  // ~BatchingSigner waits for the calls in flight.
  ~BatchingSigner();
  BatchingSigner(const BatchingSigner&) = delete;
  BatchingSigner& operator=(const BatchingSigner&) = delete;

  // Sign queues `request`; `done` runs once with its outcome. Thread-safe.
  void Sign(custody::v1::SignRequest request, Done done);

  // SignMany queues several requests at once, so that they leave together (one SignBatch per
  // 64) when a call may start. Thread-safe.
  void SignMany(std::vector<std::pair<custody::v1::SignRequest, Done>> requests);

 private:
  struct Pending {
    custody::v1::SignRequest request;
    Done done;
  };
  struct Batch;

  // TakeBatchLocked moves up to 64 queued requests into a new batch (mu_ held).
  std::unique_ptr<Batch> TakeBatchLocked();
  void Send(std::unique_ptr<Batch> batch);
  void Finish(Batch* batch, const grpc::Status& status);
  // Poll delivers finished calls from cq_ until it is shut down.
  void Poll();

  std::vector<std::unique_ptr<custody::v1::KeyService::Stub>> stubs_;
  const int max_in_flight_;
  const absl::Duration deadline_;

  std::mutex mu_;  // Guards what follows.
  std::condition_variable idle_;
  std::deque<Pending> queue_;
  int in_flight_ = 0;
  std::size_t next_stub_ = 0;

  // Calls complete on our own queue and thread (not gRPC's callback threads), so that the
  // destructor knows when gRPC is done with every call: it shuts the queue down and joins.
  grpc::CompletionQueue cq_;
  std::mutex send_mu_;  // Held while a call is set up; Poll takes it before finishing a call.
  std::thread poller_;
};

}  // namespace custody::keyservice
