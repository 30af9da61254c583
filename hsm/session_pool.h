// SessionPool: logged-in PKCS#11 sessions on one slot, lent out one caller at a time. Its size
// is the number of HSM operations in flight at once.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "hsm/pkcs11.h"

namespace custody::hsm {

class SessionPool {
 public:
  // Lease is one borrowed session. It goes back to the pool on destruction, or is closed when
  // marked lost. Move-only; must not outlive the pool.
  class Lease {
   public:
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&&) = delete;
    Lease(const Lease&) = delete;
    ~Lease();
    CK_SESSION_HANDLE get() const { return handle_; }
    // MarkBroken records what a failed call said about the session (see SessionFault). On
    // release: kSessionOnly closes this session; kSessionsGone and kLoginLost retire every
    // session opened before now (idle or lent out), closing them for kLoginLost and forgetting
    // them for kSessionsGone; kNone and kStaleObject return the session to the pool.
    void MarkBroken(SessionFault fault) { fault_ = fault; }

   private:
    friend class SessionPool;
    Lease(SessionPool* pool, CK_SESSION_HANDLE handle, uint64_t generation)
        : pool_(pool), handle_(handle), generation_(generation) {}
    SessionPool* pool_;
    CK_SESSION_HANDLE handle_;
    uint64_t generation_;
    SessionFault fault_ = SessionFault::kNone;
  };

  // SessionPool lends at most `size` sessions on `slot`, each logged in as the user with `pin`.
  // Sessions are opened lazily.
  SessionPool(std::shared_ptr<Pkcs11Module> module, CK_SLOT_ID slot, std::string pin,
              std::size_t size);
  ~SessionPool();
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;

  // Acquire lends a logged-in session, waiting until `deadline` for one to come free
  // (DEADLINE_EXCEEDED after that). Opening or logging in may fail with the token's status.
  // Thread-safe.
  [[nodiscard]] absl::StatusOr<Lease> Acquire(absl::Time deadline);

  // RunQuiescent runs `fn` once no session is lent out, holding every other caller off while it
  // runs (waits until `deadline`, then DEADLINE_EXCEEDED). For drills that must not race the
  // module: SoftHSM2 crashes if C_CloseAllSessions runs while another thread uses a session.
  [[nodiscard]] absl::Status RunQuiescent(absl::Time deadline, absl::FunctionRef<CK_RV()> fn,
                                          const std::string& what);

  // size is the pool's capacity; in_use the sessions lent out now. Thread-safe.
  std::size_t size() const { return size_; }
  std::size_t in_use() const;

  const std::shared_ptr<Pkcs11Module>& module() const { return module_; }
  CK_SLOT_ID slot() const { return slot_; }

 private:
  struct Idle {
    CK_SESSION_HANDLE handle;
    uint64_t generation;
  };
  absl::StatusOr<CK_SESSION_HANDLE> OpenLoggedIn();
  void Release(CK_SESSION_HANDLE handle, uint64_t generation, SessionFault fault);
  // DropIdleLocked forgets every idle session and returns their handles for closing.
  std::vector<CK_SESSION_HANDLE> DropIdleLocked();  // Needs mu_ held.

  const std::shared_ptr<Pkcs11Module> module_;
  const CK_SLOT_ID slot_;
  const std::string pin_;
  const std::size_t size_;

  // std::mutex, not absl::Mutex: the system Abseil is not instrumented for ThreadSanitizer.
  // Everything below is guarded by mu_; changed_ is signalled whenever it changes.
  mutable std::mutex mu_;
  std::condition_variable changed_;
  std::vector<Idle> idle_;
  std::size_t open_ = 0;  // Idle plus lent out.
  // Sessions opened before the latest loss belong to an older generation and are not reused.
  uint64_t generation_ = 0;
  int quiescing_ = 0;  // RunQuiescent calls waiting or running.
  // Why the latest generation was retired: the token dropped its sessions (true) or lost its
  // login (false).
  bool sessions_gone_ = false;
};

}  // namespace custody::hsm
