#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "custody/v1/key_service.grpc.pb.h"
#include "keyservice/client.h"
#include "keyservice/stream_signer.h"
#include "proxy/provider/key_signer.h"

namespace custody::provider {
namespace {

class GrpcKeySigner;

// Signing streams per key service channel: two, so that with several replicas the signatures
// spread over two of them (gRPC's round-robin places each new stream on the next ready one).
constexpr int kSignLanes = 2;

// DeferredSign is a signature asked for and not yet sent: in this thread's deferred list
// (SetDeferredSigns) or in a signer's dispatch queue.
struct DeferredSign {
  GrpcKeySigner* signer;
  custody::v1::SignRequest request;
  absl::Time deadline;
  KeySigner::SignDone done;
};
thread_local bool t_defer_signs = false;
thread_local std::vector<DeferredSign> t_deferred;
thread_local SignLane* t_lane = nullptr;

absl::Status FromGrpc(const grpc::Status& st) {
  return absl::Status(static_cast<absl::StatusCode>(st.error_code()),
                      absl::StrCat("key service: ", st.error_message()));
}

// ToStreamDone adapts a SignDone to StreamSigner's callback.
keyservice::StreamSigner::Done ToStreamDone(KeySigner::SignDone done) {
  return [done = std::move(done)](const grpc::Status& st, const custody::v1::SignResponse& resp) {
    if (st.ok()) {
      done(resp);
    } else {
      done(FromGrpc(st));
    }
  };
}

// GrpcKeySigner: unary calls on one mutual-TLS channel for blocking use; asynchronous requests
// go to a StreamSigner (long-lived SignStream calls), handed over by the event loop that
// deferred them or, for other callers, by a dispatcher thread (so no gRPC call starts on a
// caller's stack, which may be an ASYNC job's).
class GrpcKeySigner final : public KeySigner {
 public:
  GrpcKeySigner(std::shared_ptr<grpc::Channel> channel, absl::Duration sign_timeout)
      : stub_(custody::v1::KeyService::NewStub(channel)),
        sign_timeout_(sign_timeout),
        streams_(channel, kSignLanes),
        dispatcher_([this] { Dispatch(); }) {}

  ~GrpcKeySigner() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    wake_.notify_all();
    dispatcher_.join();
  }

  void SignAsync(const custody::v1::SignRequest& request, absl::Time deadline,
                 SignDone done) override {
    if (t_defer_signs) {
      t_deferred.push_back({this, request, deadline, std::move(done)});
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back({this, request, deadline, std::move(done)});
    }
    wake_.notify_one();
  }

  // SubmitNow hands `items` (all for this signer) to the streams from the calling thread.
  void SubmitNow(std::vector<DeferredSign>& items) {
    std::vector<keyservice::StreamSigner::Request> batch;
    batch.reserve(items.size());
    const absl::Time latest = absl::Now() + sign_timeout_;
    for (DeferredSign& item : items) {
      batch.push_back({std::move(item.request), std::min(item.deadline, latest),
                       ToStreamDone(std::move(item.done))});
    }
    if (t_lane != nullptr && t_lane->TrySend(batch, fallback_)) {
      return;
    }
    streams_.SignMany(std::move(batch));
  }

  // SetSelf gives the signer the owner it is made with, for lanes' fallbacks.
  void SetSelf(const std::shared_ptr<GrpcKeySigner>& self) {
    fallback_ = std::make_shared<const SignLane::Fallback>(
        [weak = std::weak_ptr<GrpcKeySigner>(self)](SignLane::Requests requests) {
          if (std::shared_ptr<GrpcKeySigner> signer = weak.lock()) {
            signer->streams_.SignMany(std::move(requests));
            return;
          }
          for (keyservice::StreamSigner::Request& r : requests) {
            r.done(grpc::Status(grpc::StatusCode::CANCELLED, "the key client is shutting down"),
                   {});
          }
        });
  }

  absl::StatusOr<custody::v1::SignResponse> Sign(const custody::v1::SignRequest& request,
                                                 absl::Time deadline) override {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(deadline));
    custody::v1::SignResponse response;
    if (grpc::Status st = stub_->Sign(&ctx, request, &response); !st.ok()) {
      return FromGrpc(st);
    }
    return response;
  }

  absl::StatusOr<custody::v1::Key> GetKey(const std::string& name, absl::Time deadline) override {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(deadline));
    custody::v1::GetKeyRequest request;
    request.set_name(name);
    custody::v1::Key key;
    if (grpc::Status st = stub_->GetKey(&ctx, request, &key); !st.ok()) {
      return FromGrpc(st);
    }
    return key;
  }

 private:
  // Dispatch moves queued requests to the batcher until the signer is destroyed.
  void Dispatch() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) {
        return;  // Stopping, and nothing left to send.
      }
      std::vector<DeferredSign> one;
      one.push_back(std::move(queue_.front()));
      queue_.pop_front();
      lock.unlock();
      SubmitNow(one);
      lock.lock();
    }
  }

  std::unique_ptr<custody::v1::KeyService::Stub> stub_;
  const absl::Duration sign_timeout_;
  keyservice::StreamSigner streams_;
  std::shared_ptr<const SignLane::Fallback> fallback_;  // Over streams_, for lanes.
  std::mutex mu_;                                       // Guards queue_ and stopping_.
  std::condition_variable wake_;
  std::deque<DeferredSign> queue_;
  bool stopping_ = false;
  std::thread dispatcher_;  // Last: starts once everything above exists.
};

}  // namespace

void SetDeferredSigns(bool on) { t_defer_signs = on; }

void SetSignLane(SignLane* lane) { t_lane = lane; }

void FlushDeferredSigns() {
  while (!t_deferred.empty()) {
    std::vector<DeferredSign> all;
    all.swap(t_deferred);
    // Usually one signer; group by signer, keeping each one's order.
    while (!all.empty()) {
      GrpcKeySigner* signer = all.front().signer;
      std::vector<DeferredSign> mine;
      std::vector<DeferredSign> rest;
      for (DeferredSign& d : all) {
        (d.signer == signer ? mine : rest).push_back(std::move(d));
      }
      signer->SubmitNow(mine);
      all.swap(rest);
    }
  }
}

std::shared_ptr<KeySigner> MakeGrpcKeySigner(std::shared_ptr<grpc::Channel> channel,
                                             absl::Duration sign_timeout) {
  auto signer = std::make_shared<GrpcKeySigner>(std::move(channel), sign_timeout);
  signer->SetSelf(signer);
  return signer;
}

absl::StatusOr<std::shared_ptr<KeySigner>> MakeGrpcKeySignerFromEnv() {
  const char* identity = std::getenv("CUSTODY_IDENTITY");
  auto settings = keyservice::SettingsForIdentity(
      {}, identity != nullptr && *identity != '\0' ? identity : "proxy");
  if (!settings.ok()) {
    return settings.status();
  }
  auto channel = keyservice::MakeChannel(*settings);
  if (!channel.ok()) {
    return channel.status();
  }
  return MakeGrpcKeySigner(*std::move(channel), kSignTimeout);
}

}  // namespace custody::provider
