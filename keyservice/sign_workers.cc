#include "keyservice/sign_workers.h"

#include <deque>
#include <mutex>
#include <unordered_set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace custody::keyservice {
namespace {

using custody::v1::SignStreamRequest;
using custody::v1::SignStreamResponse;

// Tag is what a completion queue hands back: one pending operation of a call. Proceed runs on
// the queue's thread with the operation's outcome.
class Tag {
 public:
  virtual ~Tag() = default;
  virtual void Proceed(bool ok) = 0;
};

// UnaryCall is one asynchronous unary RPC of the signing path, from the moment it is requested
// until its answer is sent; it deletes itself on its last event.
template <typename Request, typename Response>
class UnaryCall final : public Tag {
 public:
  using Handler = grpc::Status (KeyServiceImpl::*)(grpc::ServerContext*, const Request*, Response*);
  using Requester = void (KeyServiceImpl::*)(grpc::ServerContext*, Request*,
                                             grpc::ServerAsyncResponseWriter<Response>*,
                                             grpc::CompletionQueue*, grpc::ServerCompletionQueue*,
                                             void*);

  // Start asks gRPC for the next call of this method on `queue`.
  static void Start(KeyServiceImpl& service, grpc::ServerCompletionQueue* queue, Handler handler,
                    Requester requester) {
    auto* call = new UnaryCall(service, queue, handler, requester);
    (service.*requester)(&call->context_, &call->request_, &call->responder_, queue, queue,
                         static_cast<Tag*>(call));
  }

  void Proceed(bool ok) override {
    if (answered_ || !ok) {
      // The answer went out (or the server is shutting down): the call is over.
      delete this;
      return;
    }
    const grpc::Status status = (service_.*handler_)(&context_, &request_, &response_);
    answered_ = true;
    if (status.ok()) {
      responder_.Finish(response_, status, static_cast<Tag*>(this));
    } else {
      responder_.FinishWithError(status, static_cast<Tag*>(this));
    }
    // Ask for the next call of this kind only when free: a call matched to a busy worker
    // would wait behind its signatures while other workers idle.
    Start(service_, queue_, handler_, requester_);
  }

 private:
  UnaryCall(KeyServiceImpl& service, grpc::ServerCompletionQueue* queue, Handler handler,
            Requester requester)
      : service_(service), queue_(queue), handler_(handler), requester_(requester) {}

  KeyServiceImpl& service_;
  grpc::ServerCompletionQueue* queue_;
  Handler handler_;
  Requester requester_;
  bool answered_ = false;
  grpc::ServerContext context_;
  Request request_;
  Response response_;
  grpc::ServerAsyncResponseWriter<Response> responder_{&context_};
};

void StartSign(KeyServiceImpl& service, grpc::ServerCompletionQueue* queue) {
  UnaryCall<custody::v1::SignRequest, custody::v1::SignResponse>::Start(
      service, queue, &KeyServiceImpl::HandleSign, &KeyServiceImpl::RequestSign);
}

void StartSignBatch(KeyServiceImpl& service, grpc::ServerCompletionQueue* queue) {
  UnaryCall<custody::v1::SignBatchRequest, custody::v1::SignBatchResponse>::Start(
      service, queue, &KeyServiceImpl::HandleSignBatch, &KeyServiceImpl::RequestSignBatch);
}

// StreamCall is one SignStream call. Its queue's thread reads messages into a backlog; one
// signing task per call takes the backlog's items together and signs them: on the queue's
// thread when they are quick (KeyServiceImpl::QuickToSign: ECDSA in a local token), else on
// the service's helper threads, several at once when that pays (KeyServiceImpl::SlowToSign).
// Results are written as they come, several per write when they queue up behind a write in
// progress. At most kMaxStreamPending items are signed or waiting at once: beyond that the call
// stops reading, and HTTP/2 flow control slows the client.
//
// Life: one read, one write and the signing task may be outstanding at once; the call finishes
// once reading has ended (the client half-closed, went away, or broke the protocol, or keyd is
// draining) and nothing is outstanding, and it deletes itself when gRPC confirms the finish.
class StreamCall final {
 public:
  static constexpr int kMaxStreamPending = 256;

  static void Start(KeyServiceImpl& service, grpc::ServerCompletionQueue* queue,
                    SignWorkers::Streams* streams) {
    auto* call = new StreamCall(service, queue, streams);
    service.RequestSignStream(&call->context_, &call->stream_, queue, queue, &call->accepted_);
  }

  // Drain stops reading; the call ends (CANCELLED, so that the client opens a new stream, on
  // another replica) as soon as the items already read are answered.
  void Drain() {
    std::lock_guard<std::mutex> lock(mu_);
    draining_ = true;
    MaybeFinishLocked();
  }

 private:
  // Op routes one kind of completion to the call.
  class Op final : public Tag {
   public:
    Op(StreamCall* call, void (StreamCall::*fn)(bool)) : call_(call), fn_(fn) {}
    void Proceed(bool ok) override { (call_->*fn_)(ok); }

   private:
    StreamCall* call_;
    void (StreamCall::*fn_)(bool);
  };

  StreamCall(KeyServiceImpl& service, grpc::ServerCompletionQueue* queue,
             SignWorkers::Streams* streams)
      : service_(service), queue_(queue), streams_(streams) {}

  void OnAccepted(bool ok) {
    if (!ok) {
      delete this;  // The server is shutting down; no call was matched.
      return;
    }
    Start(service_, queue_, streams_);  // Be ready for the next stream.
    caller_ = CallerOf(context_);
    spdlog::debug("SignStream opened by {} ({})", caller_.identity, caller_.peer);
    bool draining = false;
    {
      std::lock_guard<std::mutex> lock(streams_->mu);
      streams_->open.insert(static_cast<void*>(this));
      draining = streams_->draining;
    }
    std::lock_guard<std::mutex> lock(mu_);
    draining_ = draining;
    ReadLocked();
    MaybeFinishLocked();
  }

  void ReadLocked() {
    if (draining_) {
      return;
    }
    reading_ = true;
    stream_.Read(&in_, &read_);
  }

  void OnRead(bool ok) {
    const absl::Time received = absl::Now();
    std::unique_lock<std::mutex> lock(mu_);
    reading_ = false;
    if (!ok) {
      read_done_ = true;  // Half-closed by the client, or the call is over.
      MaybeFinishLocked();
      return;
    }
    if (absl::Status st = TakeSignStreamMessage(in_, received, ids_, backlog_); !st.ok()) {
      FailLocked(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(st.message())));
      return;
    }
    in_.Clear();
    if (PendingLocked() < kMaxStreamPending) {
      ReadLocked();
    }
    if (signing_) {
      return;  // The call's signing task takes these items next.
    }
    signing_ = true;
    const SignCosts::Cost backlog = service_.CostOfReceived(backlog_);
    lock.unlock();
    if (KeyServiceImpl::QuickToSign(backlog)) {
      // Quick signatures (ECDSA in a local token) are made right here, as unary calls are:
      // handing them to a helper thread costs more than it spares (measured: ~4% of keyd's
      // CPU per ECDSA signature).
      SignBacklog();
      return;
    }
    // Longer ones (RSA, a remote HSM) go to a helper thread (signed several at once when that
    // pays), and this thread goes on reading: measured, RSA signed here cost the proxy ~10%
    // more CPU per handshake, its requests read late and answered in bursts.
    service_.Post([this] { SignBacklog(); });
  }

  // SignBacklog is the call's one signing task: it takes every item read so far (up to 64 at a
  // time) and signs them (several at once when that pays, see KeyServiceImpl::SignEach), until
  // none is left. One task per call keeps CPU-bound signing (SoftHSM) from running many
  // signatures of one client at once on a CPU that can only do one, and items that arrive while
  // it signs are taken together next.
  void SignBacklog() {
    for (;;) {
      std::vector<ReceivedItem> batch;
      {
        std::lock_guard<std::mutex> lock(mu_);
        batch = TakeSignBatch(backlog_);
        if (batch.empty()) {
          signing_ = false;
          MaybeFinishLocked();
          return;
        }
      }
      service_.SignEach(static_cast<int>(batch.size()), service_.CostOfReceived(batch), [&](int i) {
        custody::v1::SignStreamResult result;
        result.set_id(batch[i].item.id());
        service_.SignStreamItem(caller_, batch[i].received, batch[i].item,
                                result.mutable_outcome());
        std::lock_guard<std::mutex> lock(mu_);
        ids_.erase(result.id());
        if (!broken_) {
          *queued_.add_results() = std::move(result);
        }
        if (!reading_ && !read_done_ && PendingLocked() < kMaxStreamPending) {
          ReadLocked();
        }
        WriteLocked();
      });
    }
  }

  // PendingLocked counts the items read and not yet answered.
  int PendingLocked() const { return static_cast<int>(ids_.size()); }

  // WriteLocked starts a write of the queued results when none is in progress.
  void WriteLocked() {
    if (writing_ || finishing_) {
      return;
    }
    if (queued_.results_size() == 0) {
      MaybeFinishLocked();
      return;
    }
    writing_ = true;
    sending_.Clear();
    sending_.Swap(&queued_);
    stream_.Write(sending_, &written_);
  }

  void OnWritten(bool ok) {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {
      broken_ = true;  // The client is gone: results have nowhere to go.
      queued_.Clear();
    }
    WriteLocked();
  }

  // FailLocked ends the call with `status` once the items already read are answered.
  void FailLocked(grpc::Status status) {
    spdlog::warn("SignStream from {} ({}): {}", caller_.identity, caller_.peer,
                 status.error_message());
    status_ = std::move(status);
    read_done_ = true;
    MaybeFinishLocked();
  }

  void MaybeFinishLocked() {
    if (PendingLocked() > 0 || signing_ || writing_ || finishing_ || queued_.results_size() > 0) {
      return;
    }
    if (draining_ && !cancelled_) {
      // Every item read is answered: end the call. The read in progress (if any) fails.
      cancelled_ = true;
      context_.TryCancel();
      read_done_ = read_done_ || !reading_;
    }
    if (!read_done_ || reading_) {
      return;
    }
    finishing_ = true;
    stream_.Finish(status_, &finished_);
  }

  void OnFinished(bool /*ok*/) {
    {
      std::lock_guard<std::mutex> lock(streams_->mu);
      streams_->open.erase(static_cast<void*>(this));
    }
    {
      // Whoever started the finish has let go of the lock before the call goes.
      std::lock_guard<std::mutex> lock(mu_);
    }
    delete this;
  }

  KeyServiceImpl& service_;
  grpc::ServerCompletionQueue* const queue_;
  SignWorkers::Streams* const streams_;
  grpc::ServerContext context_;
  grpc::ServerAsyncReaderWriter<SignStreamResponse, SignStreamRequest> stream_{&context_};
  Caller caller_;  // Read once, on acceptance (the context is not thread-safe).
  Op accepted_{this, &StreamCall::OnAccepted};
  Op read_{this, &StreamCall::OnRead};
  Op written_{this, &StreamCall::OnWritten};
  Op finished_{this, &StreamCall::OnFinished};

  std::mutex mu_;  // Guards what follows.
  SignStreamRequest in_;
  SignStreamResponse queued_;         // Results waiting for the write in progress.
  SignStreamResponse sending_;        // The write in progress.
  std::unordered_set<uint64_t> ids_;  // Items read and not yet answered (backlog included).
  std::deque<ReceivedItem> backlog_;  // Read, not yet taken by the signing task.
  bool signing_ = false;              // The signing task is posted or running.
  bool reading_ = false;
  bool read_done_ = false;
  bool writing_ = false;
  bool broken_ = false;
  bool finishing_ = false;
  bool draining_ = false;
  bool cancelled_ = false;
  grpc::Status status_;
};

}  // namespace

SignWorkers::SignWorkers(KeyServiceImpl& service,
                         std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues)
    : service_(service), queues_(std::move(queues)) {}

SignWorkers::~SignWorkers() { Stop(); }

void SignWorkers::Start() {
  for (auto& queue : queues_) {
    threads_.emplace_back([this, q = queue.get()] { Run(q); });
  }
}

void SignWorkers::Drain() {
  std::lock_guard<std::mutex> lock(streams_.mu);
  streams_.draining = true;
  for (void* call : streams_.open) {
    static_cast<StreamCall*>(call)->Drain();
  }
}

void SignWorkers::Stop() {
  if (threads_.empty()) {
    return;
  }
  for (auto& queue : queues_) {
    queue->Shutdown();
  }
  for (auto& t : threads_) {
    t.join();
  }
  threads_.clear();
}

void SignWorkers::Run(grpc::ServerCompletionQueue* queue) {
  StartSign(service_, queue);
  StartSignBatch(service_, queue);
  StreamCall::Start(service_, queue, &streams_);
  void* tag = nullptr;
  bool ok = false;
  while (queue->Next(&tag, &ok)) {
    static_cast<Tag*>(tag)->Proceed(ok);
  }
}

}  // namespace custody::keyservice
