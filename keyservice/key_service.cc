#include "keyservice/key_service.h"

#include <openssl/evp.h>
#include <sched.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <map>

#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/config_check.h"
#include "common/log.h"
#include "common/status.h"

namespace custody::keyservice {
namespace {

using custody::v1::Key;
using custody::v1::KeyVersion;

std::string CodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

// CheckKeyName refuses what is not a key name before it reaches the audit log, logs or metrics.
absl::Status CheckKeyName(const std::string& name) {
  const bool ok = IsValidKeyName(name);
  if (!ok) {
    return absl::InvalidArgumentError(
        "key_name must be 1 to 128 characters from A-Z a-z 0-9 . _ -");
  }
  return absl::OkStatus();
}

double Seconds(absl::Time start) { return absl::ToDoubleSeconds(absl::Now() - start); }

int64_t Micros(absl::Time start) { return absl::ToInt64Microseconds(absl::Now() - start); }

// ThreadUsage is the CPU time the calling thread has used and the times it gave up the CPU to
// wait (voluntary context switches; being preempted is not waiting).
struct ThreadUsage {
  int64_t cpu_us = 0;
  int64_t waits = 0;
};
ThreadUsage ThreadUsageNow() {
  rusage ru{};
  getrusage(RUSAGE_THREAD, &ru);
  return {static_cast<int64_t>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 +
              ru.ru_utime.tv_usec + ru.ru_stime.tv_usec,
          ru.ru_nvcsw};
}

custody::v1::KeyType ToProto(hsm::KeyType type) {
  switch (type) {
    case hsm::KeyType::kEcP256:
      return custody::v1::KEY_TYPE_EC_P256;
    case hsm::KeyType::kEcP384:
      return custody::v1::KEY_TYPE_EC_P384;
    case hsm::KeyType::kRsa:
      return custody::v1::KEY_TYPE_RSA;
    case hsm::KeyType::kEd25519:
      return custody::v1::KEY_TYPE_ED25519;
    case hsm::KeyType::kEcP521:
      return custody::v1::KEY_TYPE_EC_P521;
  }
  return custody::v1::KEY_TYPE_UNSPECIFIED;
}

// Grouped returns the backend's key versions by name, lowest version first.
std::map<std::string, std::vector<hsm::KeyVersionInfo>> Grouped(const hsm::KeyBackend& backend) {
  std::map<std::string, std::vector<hsm::KeyVersionInfo>> out;
  for (hsm::KeyVersionInfo& v : backend.ListKeys()) {
    out[v.name].push_back(std::move(v));
  }
  for (auto& [name, versions] : out) {
    std::sort(versions.begin(), versions.end(),
              [](const auto& a, const auto& b) { return a.version < b.version; });
  }
  return out;
}

// Set once before serving (SetUnixSocketCaller), read-only afterwards.
std::string g_unix_identity;
std::string g_unix_label;

}  // namespace

void SetUnixSocketCaller(std::string identity, std::string label) {
  g_unix_identity = std::move(identity);
  g_unix_label = std::move(label);
}

Caller CallerOf(const grpc::ServerContext& context) {
  Caller caller;
  caller.peer = context.peer();
  if (!g_unix_identity.empty() && absl::StartsWith(caller.peer, "fd:")) {
    // Only UnixListener hands connections to gRPC by descriptor, after checking the caller's
    // uid: every call on one is made as the socket's identity.
    caller.identity = g_unix_identity;
    caller.peer = absl::StrCat(g_unix_label, " (", caller.peer, ")");
    return caller;
  }
  const auto auth = context.auth_context();
  if (auth != nullptr && auth->IsPeerAuthenticated()) {
    const auto cn = auth->FindPropertyValues("x509_common_name");
    if (!cn.empty()) {
      caller.identity.assign(cn.front().data(), cn.front().size());
    }
  }
  return caller;
}

grpc::Status ToGrpcStatus(const absl::Status& status, const std::string& request_id) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return grpc::Status::OK;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kDeadlineExceeded:
      return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                          std::string(status.message()));
    default:
      spdlog::error("request={} failed: {}", request_id, status.ToString());
      return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                          absl::StrCat("key service could not complete the request (request ",
                                       request_id, "); see its log"));
  }
}

std::string DerToPem(const std::string& label, const std::vector<uint8_t>& der) {
  std::string out = absl::StrCat("-----BEGIN ", label, "-----\n");
  for (std::size_t off = 0; off < der.size(); off += 48) {
    const std::size_t n = std::min<std::size_t>(48, der.size() - off);
    unsigned char b64[65];
    const int len = EVP_EncodeBlock(b64, der.data() + off, static_cast<int>(n));
    out.append(reinterpret_cast<const char*>(b64), static_cast<std::size_t>(len));
    out += '\n';
  }
  absl::StrAppend(&out, "-----END ", label, "-----\n");
  return out;
}

void FillKey(const std::vector<hsm::KeyVersionInfo>& versions, Key* key) {
  if (versions.empty()) {
    return;
  }
  const hsm::KeyVersionInfo& active = versions.back();
  key->set_name(active.name);
  key->set_type(ToProto(active.type));
  key->set_bits(active.bits);
  key->set_active_version(active.version);
  for (const hsm::KeyVersionInfo& v : versions) {
    KeyVersion* kv = key->add_versions();
    kv->set_version(v.version);
    kv->set_state(v.version == active.version ? custody::v1::KEY_STATE_ACTIVE
                                              : custody::v1::KEY_STATE_RETIRED);
    kv->set_public_key_der(v.public_key_der.data(), v.public_key_der.size());
    kv->set_public_key_pem(DerToPem("PUBLIC KEY", v.public_key_der));
    std::string chain_pem;
    for (const auto& cert : v.certificate_chain) {
      kv->add_certificate_chain_der(cert.data(), cert.size());
      chain_pem += DerToPem("CERTIFICATE", cert);
    }
    kv->set_certificate_chain_pem(chain_pem);
    for (hsm::SignatureScheme s : hsm::SchemesForKey(v.type)) {
      kv->add_schemes(static_cast<custody::v1::SignatureScheme>(s));
    }
    kv->set_certificate_not_after(v.not_after);
  }
}

absl::StatusOr<hsm::SignResult> KeyServiceImpl::CheckAndSign(
    const Caller& caller, const custody::v1::SignRequest& request,
    const std::optional<hsm::SchemeInfo>& scheme, absl::Time deadline) {
  if (caller.identity.empty()) {
    return absl::PermissionDeniedError("caller certificate has no common name");
  }
  CUSTODY_RETURN_IF_ERROR(CheckKeyName(request.key_name()));
  if (!policy_.MaySign(caller.identity, request.key_name())) {
    return absl::PermissionDeniedError(absl::StrCat(
        "identity '", caller.identity, "' may not sign with key '", request.key_name(), "'"));
  }
  if (!scheme) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown signature scheme ", static_cast<int>(request.scheme()),
        " (use a TLS SignatureScheme code point, e.g. 0x0403 ecdsa_secp256r1_sha256)"));
  }
  const bool is_message = request.input_case() == custody::v1::SignRequest::kMessage;
  if (absl::Now() >= deadline) {
    // It waited too long (in a queue, behind a busy HSM): the caller has given up on it.
    return absl::DeadlineExceededError("the request's deadline passed before it was signed");
  }
  const std::string& in = is_message ? request.message() : request.digest();
  CUSTODY_ASSIGN_OR_RETURN(
      const hsm::SignInput input,
      hsm::PrepareSignInput(
          *scheme, is_message,
          absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(in.data()), in.size()),
          limits_.max_message_bytes));
  return backend_.Sign(request.key_name(), request.version(), input, deadline);
}

bool UsesSeveralCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  return sched_getaffinity(0, sizeof(set), &set) != 0 || CPU_COUNT(&set) > 1;
}

grpc::Status KeyServiceImpl::HandleSign(grpc::ServerContext* context,
                                        const custody::v1::SignRequest* request,
                                        custody::v1::SignResponse* response) {
  return SignFor(CallerOf(*context), absl::FromChrono(context->deadline()), request, response);
}

grpc::Status KeyServiceImpl::SignFor(const Caller& caller, absl::Time call_deadline,
                                     const custody::v1::SignRequest* request,
                                     custody::v1::SignResponse* response) {
  const absl::Time start = absl::Now();
  metrics_.SignStarted();
  // Only a well-formed name goes into the audit record; a scheme outside the 16-bit TLS range
  // is no scheme.
  const bool name_ok = CheckKeyName(request->key_name()).ok();
  const int scheme_code = static_cast<int>(request->scheme());
  const auto scheme = scheme_code > 0 && scheme_code <= 0xffff
                          ? hsm::FindScheme(static_cast<uint16_t>(scheme_code))
                          : std::nullopt;
  AuditRecord record{caller.identity,
                     caller.peer,
                     "sign",
                     name_ok ? request->key_name() : "",
                     request->version(),
                     scheme ? scheme->name : ""};

  // The waiting share is only used where keyd may run on one CPU (see SlowToSign).
  const bool measure_wait = !multi_cpu_ && helpers_ != nullptr;
  const ThreadUsage before = measure_wait ? ThreadUsageNow() : ThreadUsage{};
  absl::StatusOr<hsm::SignResult> result =
      CheckAndSign(caller, *request, scheme, std::min(start + limits_.sign_timeout, call_deadline));
  const ThreadUsage after = measure_wait ? ThreadUsageNow() : ThreadUsage{};

  const absl::Status status = result.status();
  record.outcome = CodeName(status.code());
  if (result.ok()) {
    record.version = result->version;
  } else {
    record.detail = std::string(status.message());
  }
  record.latency_us = Micros(start);
  if (result.ok()) {
    // The signature's time, and the part of it spent off this thread's CPU (waiting for the
    // HSM), for QuickToSign and SlowToSign. Time off the CPU counts as waiting only if the
    // thread blocked; time spent preempted by other threads on a busy CPU is not something
    // more threads would overlap.
    const int64_t wait_us =
        after.waits > before.waits
            ? std::max<int64_t>(0, record.latency_us - (after.cpu_us - before.cpu_us))
            : 0;
    costs_.Record(request->key_name(), {record.latency_us, wait_us});
  }
  absl::StatusOr<std::string> id = audit_.Append(record);
  // Metric labels take the key name only for keys that exist and that the caller may use:
  // names sent by callers must not grow the label set without bound.
  const bool known_key = status.code() != absl::StatusCode::kPermissionDenied && name_ok &&
                         backend_.HasKey(request->key_name());
  metrics_.RecordSign(known_key ? request->key_name() : "other", scheme ? scheme->name : "other",
                      id.ok() ? record.outcome : "UNAVAILABLE", Seconds(start));
  metrics_.SignFinished();
  if (!id.ok()) {
    // Never hand out a signature the audit log does not hold.
    spdlog::error("audit: {}; signature withheld", id.status().message());
    metrics_.RecordRequest("Sign", "UNAVAILABLE");
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "audit log unavailable");
  }
  metrics_.RecordRequest("Sign", record.outcome);
  if (!result.ok()) {
    spdlog::info("sign refused: request={} caller={} key={} code={} detail={}", *id,
                 caller.identity, record.key, record.outcome, status.message());
    return ToGrpcStatus(status, *id);
  }
  response->set_signature(result->signature.data(), result->signature.size());
  response->set_version(result->version);
  response->set_request_id(*id);
  return grpc::Status::OK;
}

// SetOutcomeStatus records a failed request's status in its outcome (and drops any response).
void SetOutcomeStatus(const grpc::Status& status, custody::v1::SignOutcome* outcome) {
  if (!status.ok()) {
    outcome->clear_response();
    outcome->set_code(status.error_code());
    outcome->set_message(status.error_message());
  }
}

// A batch is signed in parallel when, at its keys' recent costs, it would take at least this
// long in turn.
constexpr int64_t kParallelBatchUs = 1000;

BatchHelpers::BatchHelpers(std::size_t threads) {
  for (std::size_t i = 0; i < threads; ++i) {
    threads_.emplace_back([this] {
      std::unique_lock<std::mutex> lock(mu_);
      for (;;) {
        wake_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
        if (tasks_.empty()) {
          return;
        }
        std::function<void()> task = std::move(tasks_.front());
        tasks_.pop_front();
        lock.unlock();
        task();
        lock.lock();
      }
    });
  }
}

BatchHelpers::~BatchHelpers() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : threads_) {
    t.join();
  }
}

void BatchHelpers::Post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push_back(std::move(task));
  }
  wake_.notify_one();
}

grpc::Status KeyServiceImpl::HandleSignBatch(grpc::ServerContext* context,
                                             const custody::v1::SignBatchRequest* request,
                                             custody::v1::SignBatchResponse* response) {
  const int n = request->requests_size();
  if (n == 0 || n > kMaxSignBatch) {
    metrics_.RecordRequest("SignBatch", "INVALID_ARGUMENT");
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("a batch holds 1 to ", kMaxSignBatch, " requests, not ", n));
  }
  for (int i = 0; i < n; ++i) {
    response->add_outcomes();
  }
  // The caller and deadline are read once, here: the server context is not thread-safe (it
  // caches its auth context on first use) and the requests may be signed on several threads.
  const Caller caller = CallerOf(*context);
  const absl::Time call_deadline = absl::FromChrono(context->deadline());
  const SignCosts::Cost total =
      CostOf(request->requests(),
             [](const custody::v1::SignRequest& r) -> const std::string& { return r.key_name(); });
  SignEach(n, total, [&](int i) {
    custody::v1::SignOutcome* outcome = response->mutable_outcomes(i);
    const grpc::Status st =
        SignFor(caller, call_deadline, &request->requests(i), outcome->mutable_response());
    SetOutcomeStatus(st, outcome);
  });
  metrics_.RecordRequest("SignBatch", "OK");
  return grpc::Status::OK;
}

// A batch is signed by the thread that read it when it would take at most this long in turn.
constexpr int64_t kQuickSignUs = 300;

bool KeyServiceImpl::QuickToSign(const SignCosts::Cost& total) {
  return total.time_us <= kQuickSignUs;
}

bool KeyServiceImpl::SlowToSign(const SignCosts::Cost& total) const {
  if (helpers_ == nullptr) {
    return false;
  }
  // Waiting (a network HSM, a slow token) overlaps on any machine; signing that is CPU work in
  // this process (SoftHSM) overlaps only when the process may use more than one CPU.
  return (multi_cpu_ ? total.time_us : total.wait_us) >= kParallelBatchUs;
}

void KeyServiceImpl::Post(std::function<void()> task) {
  if (helpers_ == nullptr) {
    task();
    return;
  }
  helpers_->Post(std::move(task));
}

void KeyServiceImpl::SignEach(int n, const SignCosts::Cost& total,
                              const std::function<void(int)>& sign_one) {
  // Signing in parallel costs thread hand-offs; it pays only when the batch would take long in
  // turn (a slow HSM, RSA, a big batch), not for a few fast signatures.
  if (n <= 1 || !SlowToSign(total)) {
    for (int i = 0; i < n; ++i) {
      sign_one(i);
    }
    return;
  }
  // This thread and up to n-1 helpers claim requests from a shared index; the call returns
  // once all n are signed. A helper that starts late finds nothing left to claim and touches
  // nothing of this frame, so the batch never waits for a helper to be scheduled. The shared
  // state is reference counted for such late helpers.
  struct Shared {
    std::atomic<int> next{0};
    std::atomic<int> finished{0};
    std::mutex mu;
    std::condition_variable all_done;
    std::function<void(int)> sign;
  };
  auto shared = std::make_shared<Shared>();
  shared->sign = sign_one;
  auto work = [n](Shared& s) {
    for (int i; (i = s.next.fetch_add(1)) < n;) {
      s.sign(i);
      if (s.finished.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.all_done.notify_all();
      }
    }
  };
  const int helpers = static_cast<int>(std::min<std::size_t>(n - 1, helpers_->size()));
  for (int h = 0; h < helpers; ++h) {
    helpers_->Post([shared, work] { work(*shared); });
  }
  work(*shared);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->all_done.wait(lock, [&] { return shared->finished.load() == n; });
}

absl::Status TakeSignStreamMessage(custody::v1::SignStreamRequest& message, absl::Time received,
                                   std::unordered_set<uint64_t>& pending,
                                   std::deque<ReceivedItem>& backlog) {
  const int n = message.items_size();
  if (n == 0 || n > kMaxSignBatch) {
    return absl::InvalidArgumentError(
        absl::StrCat("a SignStream message holds 1 to ", kMaxSignBatch, " items, not ", n));
  }
  for (int i = 0; i < n; ++i) {
    if (!pending.insert(message.items(i).id()).second) {
      for (int j = 0; j < i; ++j) {
        pending.erase(message.items(j).id());  // None of this message is taken.
      }
      return absl::InvalidArgumentError(
          absl::StrCat("SignStream item id ", message.items(i).id(), " is already pending"));
    }
  }
  for (custody::v1::SignStreamItem& item : *message.mutable_items()) {
    backlog.push_back({std::move(item), received});
  }
  return absl::OkStatus();
}

std::vector<ReceivedItem> TakeSignBatch(std::deque<ReceivedItem>& backlog) {
  std::vector<ReceivedItem> batch;
  while (!backlog.empty() && static_cast<int>(batch.size()) < kMaxSignBatch) {
    batch.push_back(std::move(backlog.front()));
    backlog.pop_front();
  }
  return batch;
}

grpc::Status KeyServiceImpl::SignStreamItem(const Caller& caller, absl::Time received,
                                            const custody::v1::SignStreamItem& item,
                                            custody::v1::SignOutcome* outcome) {
  const absl::Time deadline = item.timeout_ms() == 0
                                  ? absl::InfiniteFuture()
                                  : received + absl::Milliseconds(item.timeout_ms());
  const grpc::Status st = SignFor(caller, deadline, &item.request(), outcome->mutable_response());
  SetOutcomeStatus(st, outcome);
  return st;
}

grpc::Status KeyServiceImpl::Refuse(const Caller& caller, const std::string& method,
                                    const std::string& action, const std::string& key,
                                    const absl::Status& status, absl::Time start) {
  AuditRecord record{caller.identity, caller.peer, action, key};
  record.outcome = CodeName(status.code());
  record.detail = std::string(status.message());
  record.latency_us = Micros(start);
  const absl::StatusOr<std::string> id = audit_.Append(record);
  metrics_.RecordRequest(method, record.outcome);
  return ToGrpcStatus(status, id.ok() ? *id : "unaudited");
}

grpc::Status KeyServiceImpl::GetKey(grpc::ServerContext* context,
                                    const custody::v1::GetKeyRequest* request,
                                    custody::v1::Key* response) {
  const absl::Time start = absl::Now();
  const Caller caller = CallerOf(*context);
  if (absl::Status st = CheckKeyName(request->name()); !st.ok()) {
    return Refuse(caller, "GetKey", "get_key", "", st, start);
  }
  if (!policy_.MayRead(caller.identity, request->name())) {
    return Refuse(caller, "GetKey", "get_key", request->name(),
                  absl::PermissionDeniedError(absl::StrCat(
                      "identity '", caller.identity, "' may not read key '", request->name(), "'")),
                  start);
  }
  auto keys = Grouped(backend_);
  auto it = keys.find(request->name());
  if (it == keys.end()) {
    metrics_.RecordRequest("GetKey", "NOT_FOUND");
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("no key named '", request->name(), "'"));
  }
  FillKey(it->second, response);
  metrics_.RecordRequest("GetKey", "OK");
  return grpc::Status::OK;
}

grpc::Status KeyServiceImpl::ListKeys(grpc::ServerContext* context,
                                      const custody::v1::ListKeysRequest* /*request*/,
                                      custody::v1::ListKeysResponse* response) {
  const absl::Time start = absl::Now();
  const Caller caller = CallerOf(*context);
  if (caller.identity.empty()) {
    return Refuse(caller, "ListKeys", "list_keys", "",
                  absl::PermissionDeniedError("caller certificate has no common name"), start);
  }
  for (const auto& [name, versions] : Grouped(backend_)) {
    if (policy_.MayRead(caller.identity, name)) {
      FillKey(versions, response->add_keys());
    }
  }
  metrics_.RecordRequest("ListKeys", "OK");
  return grpc::Status::OK;
}

grpc::Status TestingServiceImpl::RunHook(const grpc::ServerContext& context,
                                         const std::string& action,
                                         const std::function<absl::Status()>& hook) {
  const absl::Time start = absl::Now();
  const Caller caller = CallerOf(context);
  const absl::Status status = policy_.IsAdmin(caller.identity)
                                  ? hook()
                                  : absl::PermissionDeniedError(absl::StrCat(
                                        "identity '", caller.identity, "' is not an admin"));
  AuditRecord record{caller.identity, caller.peer, action};
  record.outcome = CodeName(status.code());
  record.detail = std::string(status.message());
  record.latency_us = Micros(start);
  const absl::StatusOr<std::string> id = audit_.Append(record);
  spdlog::warn("test hook: {} by {}: {}", action, caller.identity, status.ToString());
  return ToGrpcStatus(status, id.ok() ? *id : "unaudited");
}

grpc::Status TestingServiceImpl::CloseAllSessions(
    grpc::ServerContext* context, const custody::v1::CloseAllSessionsRequest* /*request*/,
    custody::v1::CloseAllSessionsResponse* /*response*/) {
  return RunHook(*context, "test_hook_close_all_sessions",
                 [this] { return backend_.SimulateTokenReset(); });
}

grpc::Status TestingServiceImpl::SetFault(grpc::ServerContext* context,
                                          const custody::v1::SetFaultRequest* request,
                                          custody::v1::SetFaultResponse* /*response*/) {
  return RunHook(*context, "test_hook_set_fault", [&] {
    faults_.SetFault(request->fault());
    return absl::OkStatus();
  });
}

grpc::Status TestingServiceImpl::ReleaseHeld(grpc::ServerContext* context,
                                             const custody::v1::ReleaseHeldRequest* /*request*/,
                                             custody::v1::ReleaseHeldResponse* response) {
  return RunHook(*context, "test_hook_release_held", [&] {
    response->set_released(faults_.ReleaseHeld());
    return absl::OkStatus();
  });
}

}  // namespace custody::keyservice
