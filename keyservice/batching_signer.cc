#include "keyservice/batching_signer.h"

#include "keyservice/limits.h"

namespace custody::keyservice {

struct BatchingSigner::Batch {
  grpc::ClientContext context;
  custody::v1::SignBatchRequest request;
  custody::v1::SignBatchResponse response;
  grpc::Status status;
  std::unique_ptr<grpc::ClientAsyncResponseReader<custody::v1::SignBatchResponse>> reader;
  std::vector<Done> done;
};

BatchingSigner::BatchingSigner(std::vector<std::shared_ptr<grpc::Channel>> channels,
                               int max_in_flight, absl::Duration deadline)
    : max_in_flight_(std::max(1, max_in_flight)), deadline_(deadline) {
  for (const auto& channel : channels) {
    stubs_.push_back(custody::v1::KeyService::NewStub(channel));
  }
  poller_ = std::thread([this] { Poll(); });
}

BatchingSigner::~BatchingSigner() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    idle_.wait(lock, [this] { return in_flight_ == 0; });
  }
  // Every call has finished and been freed on the poller thread: the queue can go.
  cq_.Shutdown();
  poller_.join();
}

void BatchingSigner::Poll() {
  void* tag = nullptr;
  bool ok = false;
  while (cq_.Next(&tag, &ok)) {
    auto* batch = static_cast<Batch*>(tag);
    {
      // Send may still be returning from the call's set-up: wait for it to let go (this also
      // shows ThreadSanitizer, which cannot see inside gRPC, that the set-up came first).
      std::lock_guard<std::mutex> lock(send_mu_);
    }
    Finish(batch, batch->status);
  }
}

void BatchingSigner::Sign(custody::v1::SignRequest request, Done done) {
  std::unique_ptr<Batch> batch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back({std::move(request), std::move(done)});
    if (in_flight_ < max_in_flight_) {
      ++in_flight_;
      batch = TakeBatchLocked();
    }
  }
  if (batch != nullptr) {
    Send(std::move(batch));
  }
}

void BatchingSigner::SignMany(std::vector<std::pair<custody::v1::SignRequest, Done>> requests) {
  std::vector<std::unique_ptr<Batch>> batches;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [request, done] : requests) {
      queue_.push_back({std::move(request), std::move(done)});
    }
    while (!queue_.empty() && in_flight_ < max_in_flight_) {
      ++in_flight_;
      batches.push_back(TakeBatchLocked());
    }
  }
  for (auto& batch : batches) {
    Send(std::move(batch));
  }
}

std::unique_ptr<BatchingSigner::Batch> BatchingSigner::TakeBatchLocked() {
  auto batch = std::make_unique<Batch>();
  while (!queue_.empty() && batch->request.requests_size() < kMaxSignBatch) {
    *batch->request.add_requests() = std::move(queue_.front().request);
    batch->done.push_back(std::move(queue_.front().done));
    queue_.pop_front();
  }
  return batch;
}

void BatchingSigner::Send(std::unique_ptr<Batch> batch) {
  custody::v1::KeyService::Stub* stub = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stub = stubs_[next_stub_++ % stubs_.size()].get();
  }
  batch->context.set_deadline(absl::ToChronoTime(absl::Now() + deadline_));
  Batch* raw = batch.release();  // Owned by the call until Finish, on the poller thread.
  std::lock_guard<std::mutex> lock(send_mu_);
  raw->reader = stub->PrepareAsyncSignBatch(&raw->context, raw->request, &cq_);
  raw->reader->StartCall();
  raw->reader->Finish(&raw->response, &raw->status, raw);
}

void BatchingSigner::Finish(Batch* raw, const grpc::Status& status) {
  std::unique_ptr<Batch> batch(raw);
  const custody::v1::SignResponse empty;
  for (std::size_t i = 0; i < batch->done.size(); ++i) {
    if (!status.ok()) {
      batch->done[i](status, empty);
      continue;
    }
    if (static_cast<int>(i) >= batch->response.outcomes_size()) {
      batch->done[i](grpc::Status(grpc::StatusCode::INTERNAL, "key service skipped a request"),
                     empty);
      continue;
    }
    const custody::v1::SignOutcome& outcome = batch->response.outcomes(static_cast<int>(i));
    batch->done[i](outcome.code() == 0 ? grpc::Status::OK
                                       : grpc::Status(static_cast<grpc::StatusCode>(outcome.code()),
                                                      outcome.message()),
                   outcome.response());
  }
  std::unique_ptr<Batch> next;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (queue_.empty()) {
      --in_flight_;
      idle_.notify_all();
    } else {
      next = TakeBatchLocked();
    }
  }
  if (next != nullptr) {
    Send(std::move(next));
  }
}

}  // namespace custody::keyservice
