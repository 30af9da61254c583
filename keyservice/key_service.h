// KeyServiceImpl serves custody.v1.KeyService over a KeyBackend: checks the caller against the
// policy, validates input, signs, audits every signature and every refusal, and counts.
// TestingServiceImpl serves the test hooks (only registered with --enable-test-hooks).
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "custody/v1/key_service.grpc.pb.h"
#include "custody/v1/testing.grpc.pb.h"
#include "hsm/key_backend.h"
#include "keyservice/audit_log.h"
#include "keyservice/fault_injecting_backend.h"
#include "keyservice/limits.h"
#include "keyservice/metrics.h"
#include "keyservice/policy.h"
#include "keyservice/sign_costs.h"

namespace custody::keyservice {

// Caller is who made a call: the CN of its client certificate ("" if none) and its address.
struct Caller {
  std::string identity;
  std::string peer;
};

// SetUnixSocketCaller makes every call that arrives over keyd's Unix socket (connections handed
// to gRPC by descriptor, whose peer gRPC names "fd:N") a call by `identity`, its peer shown as
// `label`. Call once, before serving.
void SetUnixSocketCaller(std::string identity, std::string label);

// CallerOf reads the caller from a server context. Thread-safe for distinct contexts; one context
// must not be read from two threads at once (gRPC caches its auth context on first use).
Caller CallerOf(const grpc::ServerContext& context);

// ToGrpcStatus converts a status for a caller: the message of caller errors (bad input, not
// found, denied) is returned; server-side failures are answered with a generic message that
// carries `request_id`, while the details go to the log.
grpc::Status ToGrpcStatus(const absl::Status& status, const std::string& request_id);

struct ServiceLimits {
  absl::Duration sign_timeout = absl::Seconds(2);
  std::size_t max_message_bytes = 64 * 1024;
  // Requests of one SignBatch signed at once (the HSM sessions a batch may use); 1: in turn.
  std::size_t batch_parallelism = 1;
};

// ReceivedItem is one SignStream item (from gRPC's SignStream or keyd's signing socket) and when
// it was read, waiting in a stream's backlog for its signing task.
struct ReceivedItem {
  custody::v1::SignStreamItem item;
  absl::Time received;
};

// TakeSignStreamMessage checks one SignStream message read at `received` (1 to kMaxSignBatch
// items, ids not in `pending`) and moves its items to the end of `backlog`, their ids into
// `pending`. A message that breaks a rule is refused whole (INVALID_ARGUMENT, saying which).
absl::Status TakeSignStreamMessage(custody::v1::SignStreamRequest& message, absl::Time received,
                                   std::unordered_set<uint64_t>& pending,
                                   std::deque<ReceivedItem>& backlog);

// TakeSignBatch moves up to kMaxSignBatch items from the front of `backlog` (whose lock the caller
// holds) into the result.
std::vector<ReceivedItem> TakeSignBatch(std::deque<ReceivedItem>& backlog);

// UsesSeveralCpus says whether this process may run on more than one CPU (its affinity mask).
bool UsesSeveralCpus();

// BatchHelpers are threads that sign a batch's requests alongside the thread serving the
// batch, so that a batch uses as many HSM sessions as it has requests (up to the pool size)
// instead of one after the other: with an HSM that takes 5 ms per signature, a batch of 16 then
// takes 5 ms, not 80. Thread-safe.
class BatchHelpers {
 public:
  explicit BatchHelpers(std::size_t threads);
  ~BatchHelpers();
  BatchHelpers(const BatchHelpers&) = delete;
  BatchHelpers& operator=(const BatchHelpers&) = delete;

  std::size_t size() const { return threads_.size(); }
  // Post runs `task` on a helper thread.
  void Post(std::function<void()> task);

 private:
  std::mutex mu_;  // Guards tasks_ and stop_.
  std::condition_variable wake_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// KeyServiceImpl is thread-safe; it borrows everything it is given, which must outlive it.
// Sign, SignBatch and SignStream are served asynchronously (by SignWorkers, which call the
// Handle and Sign methods below on their own threads, so a signature never waits for a thread
// hop unless it is worth signing several at once); GetKey and ListKeys by gRPC's sync pool.
class KeyServiceImpl final : public custody::v1::KeyService::WithAsyncMethod_Sign<
                                 custody::v1::KeyService::WithAsyncMethod_SignBatch<
                                     custody::v1::KeyService::WithAsyncMethod_SignStream<
                                         custody::v1::KeyService::Service>>> {
 public:
  KeyServiceImpl(hsm::KeyBackend& backend, const Policy& policy, AuditLog& audit,
                 KeydMetrics& metrics, ServiceLimits limits)
      : backend_(backend),
        policy_(policy),
        audit_(audit),
        metrics_(metrics),
        limits_(limits),
        helpers_(limits.batch_parallelism > 1
                     ? std::make_unique<BatchHelpers>(limits.batch_parallelism)
                     : nullptr) {}

  // HandleSign serves one Sign call: policy, input checks, the HSM, the audit record.
  grpc::Status HandleSign(grpc::ServerContext* context, const custody::v1::SignRequest* request,
                          custody::v1::SignResponse* response);

  // HandleSignBatch serves a SignBatch call: each request as HandleSign would, several at once
  // (limits.batch_parallelism); outcomes in the requests' order.
  grpc::Status HandleSignBatch(grpc::ServerContext* context,
                               const custody::v1::SignBatchRequest* request,
                               custody::v1::SignBatchResponse* response);

  // SignStreamItem serves one item of a SignStream call read at `received` for `caller`, as
  // HandleSign would, into `outcome`.
  grpc::Status SignStreamItem(const Caller& caller, absl::Time received,
                              const custody::v1::SignStreamItem& item,
                              custody::v1::SignOutcome* outcome);
  // CostOf is what signatures with the keys key_of(item) of `items` have recently cost
  // together (see SignCosts), for QuickToSign, SlowToSign and SignEach.
  template <typename Items, typename KeyOf>
  SignCosts::Cost CostOf(const Items& items, KeyOf key_of) const {
    return costs_.Sum(items, key_of);
  }
  // CostOfReceived is CostOf for a stream's backlog or batch.
  template <typename Items>
  SignCosts::Cost CostOfReceived(const Items& items) const {
    return costs_.Sum(items, [](const ReceivedItem& r) -> const std::string& {
      return r.item.request().key_name();
    });
  }
  // SlowToSign says whether signatures of this total cost, made in turn, would take long enough
  // to be worth handing to helper threads: spread over several HSM sessions, or kept off a
  // thread that has other calls to read. False when the service has no helpers.
  bool SlowToSign(const SignCosts::Cost& total) const;
  // QuickToSign says whether signatures of this total cost take so little time in turn (at most
  // kQuickSignUs) that the thread that read them should sign them itself: a hand-off to a helper
  // costs more than it spares (a local token's ECDSA). Longer ones (RSA, a remote HSM) go to
  // helpers, and the reading thread stays free to read.
  static bool QuickToSign(const SignCosts::Cost& total);
  // SignEach runs sign_one(0..n-1), whose signatures cost `total` together, on this thread alone
  // or, when n > 1 and SlowToSign(total), with up to n-1 helper threads; it returns once all n
  // have run.
  void SignEach(int n, const SignCosts::Cost& total, const std::function<void(int)>& sign_one);
  // Post runs `task` on a helper thread (inline when the service has none).
  void Post(std::function<void()> task);

  grpc::Status GetKey(grpc::ServerContext* context, const custody::v1::GetKeyRequest* request,
                      custody::v1::Key* response) override;
  grpc::Status ListKeys(grpc::ServerContext* context, const custody::v1::ListKeysRequest* request,
                        custody::v1::ListKeysResponse* response) override;

 private:
  // SignFor serves one signature for `caller`: policy, input checks, the HSM (by the smaller of
  // `call_deadline` and the service's sign timeout), the audit record. Thread-safe.
  grpc::Status SignFor(const Caller& caller, absl::Time call_deadline,
                       const custody::v1::SignRequest* request,
                       custody::v1::SignResponse* response);

  // CheckAndSign applies the policy and the input checks, then signs (by `deadline`).
  absl::StatusOr<hsm::SignResult> CheckAndSign(const Caller& caller,
                                               const custody::v1::SignRequest& request,
                                               const std::optional<hsm::SchemeInfo>& scheme,
                                               absl::Time deadline);

  // Refuse audits a refused call (`action` in the audit log), counts it under `method`, and
  // answers it.
  grpc::Status Refuse(const Caller& caller, const std::string& method, const std::string& action,
                      const std::string& key, const absl::Status& status, absl::Time start);

  hsm::KeyBackend& backend_;
  const Policy& policy_;
  AuditLog& audit_;
  KeydMetrics& metrics_;
  const ServiceLimits limits_;
  std::unique_ptr<BatchHelpers> helpers_;  // Null when batches are signed in turn.
  SignCosts costs_;                        // Recent cost of a signature, per key.
  const bool multi_cpu_ = UsesSeveralCpus();
};

class TestingServiceImpl final : public custody::v1::KeyServiceTesting::Service {
 public:
  // TestingServiceImpl pulls its levers on `backend` (the token) and `faults` (the wrapper the
  // key service signs through when test hooks are on). Admins only; every call is audited.
  TestingServiceImpl(hsm::KeyBackend& backend, FaultInjectingKeyBackend& faults,
                     const Policy& policy, AuditLog& audit)
      : backend_(backend), faults_(faults), policy_(policy), audit_(audit) {}

  grpc::Status CloseAllSessions(grpc::ServerContext* context,
                                const custody::v1::CloseAllSessionsRequest* request,
                                custody::v1::CloseAllSessionsResponse* response) override;
  grpc::Status SetFault(grpc::ServerContext* context, const custody::v1::SetFaultRequest* request,
                        custody::v1::SetFaultResponse* response) override;
  grpc::Status ReleaseHeld(grpc::ServerContext* context,
                           const custody::v1::ReleaseHeldRequest* request,
                           custody::v1::ReleaseHeldResponse* response) override;

 private:
  // RunHook checks that the caller is an admin, runs `hook`, audits and logs it as `action`.
  grpc::Status RunHook(const grpc::ServerContext& context, const std::string& action,
                       const std::function<absl::Status()>& hook);

  hsm::KeyBackend& backend_;
  FaultInjectingKeyBackend& faults_;
  const Policy& policy_;
  AuditLog& audit_;
};

// FillKey builds the Key message for `name` from the backend's versions (lowest first).
void FillKey(const std::vector<hsm::KeyVersionInfo>& versions, custody::v1::Key* key);

// DerToPem wraps DER as PEM with `label` ("CERTIFICATE", "PUBLIC KEY").
std::string DerToPem(const std::string& label, const std::vector<uint8_t>& der);

}  // namespace custody::keyservice
