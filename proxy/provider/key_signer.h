// KeySigner: how the custody provider reaches the key service. GrpcKeySigner is the real one
// (mutual TLS, the proxy identity); tests may bring fakes.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "custody/v1/key_service.pb.h"
#include "keyservice/stream_signer.h"

namespace grpc {
class Channel;
}  // namespace grpc

namespace custody::provider {

// kSignTimeout bounds one signature, from the request to the answer.
inline constexpr absl::Duration kSignTimeout = absl::Seconds(2);

class KeySigner {
 public:
  virtual ~KeySigner() = default;

  // Sign asks the key service for one signature. Blocks until the answer or `deadline`.
  // Thread-safe.
  [[nodiscard]] virtual absl::StatusOr<custody::v1::SignResponse> Sign(
      const custody::v1::SignRequest& request, absl::Time deadline) = 0;

  // SignDone receives the outcome of SignAsync, on a key-client thread: keep it short.
  using SignDone = std::function<void(absl::StatusOr<custody::v1::SignResponse>)>;

  // SignAsync starts a signature and returns at once; `done` runs exactly once with the outcome
  // (by `deadline` at the latest). It never runs gRPC on the caller's stack, so it may be called
  // from inside an OpenSSL ASYNC job (32 KiB stack). Thread-safe.
  virtual void SignAsync(const custody::v1::SignRequest& request, absl::Time deadline,
                         SignDone done) = 0;

  // GetKey reads a key's versions, public keys and chains. Thread-safe.
  [[nodiscard]] virtual absl::StatusOr<custody::v1::Key> GetKey(const std::string& name,
                                                                absl::Time deadline) = 0;
};

// SetDeferredSigns(true) makes the SignAsync calls of GrpcKeySigners made on the calling thread
// wait in a thread-local list until FlushDeferredSigns() on that thread, which hands them to the
// key service together (one SignStream message for up to 64). An event loop driving ASYNC
// handshakes turns it on and flushes once per loop turn: the requests of one turn share one
// message, and no other thread has to be woken to send it (the ASYNC job must not run gRPC).
void SetDeferredSigns(bool on);
void FlushDeferredSigns();

// SignLane is another way to the key service for the signatures a thread flushes: the proxy
// worker's connection to keyd's signing socket (proxy/signing_lane.h). A GrpcKeySigner offers
// each flushed batch to the thread's lane first, and uses its gRPC streams when the lane is down.
class SignLane {
 public:
  using Requests = std::vector<keyservice::StreamSigner::Request>;
  // Fallback sends requests over gRPC: those the lane cannot finish (it broke with them in
  // flight, or its keyd answered UNAVAILABLE, which another replica may not).
  using Fallback = std::function<void(Requests)>;

  virtual ~SignLane() = default;
  // TrySend takes and sends `requests` and returns true, or returns false with them untouched
  // (the lane is down).
  virtual bool TrySend(Requests& requests, const std::shared_ptr<const Fallback>& fallback) = 0;
};
// SetSignLane sets the calling thread's lane (nullptr: none). The lane is used on that thread
// only.
void SetSignLane(SignLane* lane);

// MakeGrpcKeySigner signs over `channel` (mutual TLS to custody-keyd, see keyservice/client.h):
// blocking calls are unary; asynchronous ones travel on SignStream calls, each bounded by
// `sign_timeout`.
[[nodiscard]] std::shared_ptr<KeySigner> MakeGrpcKeySigner(std::shared_ptr<grpc::Channel> channel,
                                                           absl::Duration sign_timeout);

// MakeGrpcKeySignerFromEnv connects with the lab.env variables: CUSTODY_KEYD_ADDR, CUSTODY_CA
// and CUSTODY_PROXY_CERT / CUSTODY_PROXY_KEY (the identity named by CUSTODY_IDENTITY, default
// "proxy"). INVALID_ARGUMENT names what is missing.
[[nodiscard]] absl::StatusOr<std::shared_ptr<KeySigner>> MakeGrpcKeySignerFromEnv();

}  // namespace custody::provider
