#include "hsm/session_pool.h"

#include <spdlog/spdlog.h>

#include <utility>

namespace custody::hsm {

SessionPool::Lease::Lease(Lease&& other) noexcept
    : pool_(std::exchange(other.pool_, nullptr)),
      handle_(other.handle_),
      generation_(other.generation_),
      fault_(other.fault_) {}

SessionPool::Lease::~Lease() {
  if (pool_ != nullptr) {
    pool_->Release(handle_, generation_, fault_);
  }
}

SessionPool::SessionPool(std::shared_ptr<Pkcs11Module> module, CK_SLOT_ID slot, std::string pin,
                         std::size_t size)
    : module_(std::move(module)), slot_(slot), pin_(std::move(pin)), size_(size) {}

SessionPool::~SessionPool() {
  std::lock_guard<std::mutex> lock(mu_);
  for (CK_SESSION_HANDLE h : DropIdleLocked()) {
    module_->fn()->C_CloseSession(h);
  }
}

std::vector<CK_SESSION_HANDLE> SessionPool::DropIdleLocked() {
  std::vector<CK_SESSION_HANDLE> out;
  for (const Idle& i : idle_) {
    out.push_back(i.handle);
  }
  open_ -= idle_.size();
  idle_.clear();
  return out;
}

std::size_t SessionPool::in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return open_ - idle_.size();
}

absl::StatusOr<SessionPool::Lease> SessionPool::Acquire(absl::Time deadline) {
  uint64_t generation = 0;
  {
    std::unique_lock<std::mutex> lock(mu_);
    auto can_proceed = [this] { return quiescing_ == 0 && (!idle_.empty() || open_ < size_); };
    if (!changed_.wait_until(lock, absl::ToChronoTime(deadline), can_proceed)) {
      return absl::DeadlineExceededError("every HSM session stayed busy until the deadline");
    }
    if (!idle_.empty()) {
      const Idle i = idle_.back();
      idle_.pop_back();
      return Lease(this, i.handle, i.generation);
    }
    ++open_;  // Reserve the place while opening outside the lock.
    generation = generation_;
  }
  absl::StatusOr<CK_SESSION_HANDLE> h = OpenLoggedIn();
  if (!h.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    --open_;
    changed_.notify_all();
    return h.status();
  }
  return Lease(this, *h, generation);
}

absl::StatusOr<CK_SESSION_HANDLE> SessionPool::OpenLoggedIn() {
  CK_FUNCTION_LIST* fn = module_->fn();
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CK_RV rv = fn->C_OpenSession(slot_, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h);
  if (rv != CKR_OK) {
    return RvToStatus(rv, "C_OpenSession");
  }
  // The login is the application's, shared by all its sessions; it is lost when the last
  // session closes (PKCS#11 v2.40, 5.6), so every new session checks it.
  rv = fn->C_Login(h, CKU_USER, reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char*>(pin_.data())),
                   pin_.size());
  if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
    fn->C_CloseSession(h);
    return RvToStatus(rv, "C_Login");
  }
  return h;
}

absl::Status SessionPool::RunQuiescent(absl::Time deadline, absl::FunctionRef<CK_RV()> fn,
                                       const std::string& what) {
  std::unique_lock<std::mutex> lock(mu_);
  ++quiescing_;  // New Acquire calls wait, so the sessions lent out can only come back.
  const bool quiet_in_time = changed_.wait_until(lock, absl::ToChronoTime(deadline),
                                                 [this] { return open_ == idle_.size(); });
  absl::Status status =
      quiet_in_time ? RvToStatus(fn(), what)
                    : absl::DeadlineExceededError("HSM sessions stayed in use until the deadline");
  --quiescing_;
  changed_.notify_all();
  return status;
}

void SessionPool::Release(CK_SESSION_HANDLE handle, uint64_t generation, SessionFault fault) {
  std::vector<CK_SESSION_HANDLE> to_close;
  {
    std::lock_guard<std::mutex> lock(mu_);
    changed_.notify_all();  // Takes effect when the lock is released, whatever path follows.
    const bool current = generation == generation_;
    const bool token_wide =
        fault == SessionFault::kSessionsGone || fault == SessionFault::kLoginLost;
    if (current && !token_wide && fault != SessionFault::kSessionOnly) {
      idle_.push_back({handle, generation});
      return;
    }
    --open_;
    // A session of a retired generation was already invalidated by the token when the
    // generation was retired because the token dropped its sessions: forget it then.
    const bool may_close = fault != SessionFault::kSessionsGone && (current || !sessions_gone_);
    if (may_close) {
      to_close.push_back(handle);
    }
    if (current && token_wide) {
      ++generation_;
      sessions_gone_ = fault == SessionFault::kSessionsGone;
      std::vector<CK_SESSION_HANDLE> idle = DropIdleLocked();
      if (may_close) {
        to_close.insert(to_close.end(), idle.begin(), idle.end());
      }
      spdlog::warn(
          "hsm: the token dropped its sessions or login; retiring {} session(s), the "
          "next use opens one and logs in anew",
          idle.size() + 1);
    }
  }
  for (CK_SESSION_HANDLE h : to_close) {
    module_->fn()->C_CloseSession(h);  // Possibly invalid already; nothing to do on error.
  }
}

}  // namespace custody::hsm
