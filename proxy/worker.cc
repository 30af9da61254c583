#include "proxy/worker.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/ossl.h"
#include "proxy/provider/key_signer.h"

namespace custody::proxy {

int64_t NowMs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

namespace {

std::atomic<uint64_t> g_next_connection_id{1};

constexpr int kMaxEvents = 256;
constexpr int kAcceptsPerTurn = 64;
constexpr int64_t kSweepMs = 100;
// A relaying connection with no byte moving for this long gives back its relay buffers and
// OpenSSL's record buffers (both are taken again by the next read or write): an idle keep-alive
// connection then holds no buffer memory.
constexpr int64_t kReleaseIdleMs = 1000;
constexpr int64_t kAcceptBackoffMs = 100;

// SslErrorText drains this thread's OpenSSL errors into one line (for logs).
std::string SslErrorText() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    absl::StrAppend(&out, out.empty() ? "" : "; ", buf);
  }
  return out.empty() ? "no OpenSSL error" : out;
}

std::string ErrnoText(int err) { return std::strerror(err); }

}  // namespace

// Watch tags an epoll registration with what it is for.
struct Worker::Watch {
  enum class Kind : uint8_t { kListener, kControl, kReady, kLane, kClient, kBackend, kAsync };
  Kind kind;
  Connection* conn = nullptr;
  size_t listener = 0;
};

// RelayBuffer holds bytes read from one side until the other side takes them. Its memory is
// taken when a read needs room (space) and given back by Release, so an idle connection holds
// none; `held` counts what all buffers hold.
struct RelayBuffer {
  std::unique_ptr<char[]> data;
  prometheus::Gauge* held = nullptr;
  uint32_t cap = 0;
  uint32_t start = 0;
  uint32_t end = 0;

  RelayBuffer() = default;
  RelayBuffer(const RelayBuffer&) = delete;
  RelayBuffer& operator=(const RelayBuffer&) = delete;
  ~RelayBuffer() {
    if (data != nullptr) {
      held->Decrement(cap);
    }
  }

  // Init sets the size taken on first use; no memory yet.
  void Init(uint32_t bytes, prometheus::Gauge* held_bytes) {
    cap = bytes;
    held = held_bytes;
  }
  uint32_t size() const { return end - start; }
  // space is what can be appended, taking the memory if none is held; a drained front is
  // reclaimed first.
  uint32_t space() {
    if (data == nullptr) {
      data.reset(new char[cap]);
      held->Increment(cap);
    }
    if (end == cap && start > 0) {
      std::memmove(data.get(), data.get() + start, end - start);
      end -= start;
      start = 0;
    }
    return cap - end;
  }
  // Release gives the memory back if no byte is waiting in it; returns whether none is held.
  bool Release() {
    if (size() > 0) {
      return false;
    }
    if (data != nullptr) {
      data.reset();
      held->Decrement(cap);
    }
    return true;
  }
  char* head() { return data.get() + start; }
  char* tail() { return data.get() + end; }
  void Produce(uint32_t n) { end += n; }
  void Consume(uint32_t n) {
    start += n;
    if (start == end) {
      start = end = 0;
    }
  }
};

// ClientSocketFlags is what the client socket's BIO (ReadNotingShort) and the worker's epoll
// events tell each other about that socket.
struct ClientSocketFlags {
  // The socket is known to hold no byte: its last read was short or said EAGAIN, and no epoll
  // event for it came since. Edge-triggered epoll reports the next bytes, so until then a read
  // would only say EAGAIN: the BIO answers "retry" without asking the kernel. (One exception,
  // as in nginx: the kernel also cuts a read short at TCP urgent data, with bytes behind it; a
  // client that sends urgent data, which no TLS client does, stalls its own connection until
  // the handshake or idle timeout closes it.)
  bool drained = false;
  // The client's FIN (or an error) was reported: a short read no longer proves the socket empty
  // (the end is still to be read), so reads go to the kernel until the end is seen.
  bool hup = false;
};

struct Worker::Connection {
  enum class Phase { kHandshake, kConnecting, kRelay };

  uint64_t id = 0;
  sockaddr_storage peer{};  // The client's address, from accept (logs, the PROXY header).
  // The async callback's argument (see AsyncReady): enough to find the connection again.
  struct Notify {
    Worker* worker = nullptr;
    uint64_t id = 0;
  } notify;
  size_t index = 0;  // In Worker::connections_.
  size_t listener = 0;
  std::shared_ptr<const ProxyState> state;  // Keeps the listener's TLS contexts alive.
  const ListenerRuntime* runtime = nullptr;
  UniqueFd client;
  UniqueFd backend;
  OsslPtr<SSL> ssl;
  Phase phase = Phase::kHandshake;
  Watch client_watch{Watch::Kind::kClient};
  Watch backend_watch{Watch::Kind::kBackend};
  Watch async_watch{Watch::Kind::kAsync};
  bool client_registered = false;
  std::vector<int> async_fds;

  int64_t accepted_ms = 0;
  int64_t deadline_ms = 0;  // Handshake or connect deadline.
  int64_t last_active_ms = 0;

  bool paused = false;            // A handshake ASYNC job is waiting for its signature.
  bool abandoned = false;         // Closed while paused: freed once the job has finished.
  bool closed = false;            // Waiting to be freed at the end of the loop turn.
  bool queued_pump = false;       // Busy: in the worker's queue for its next relay turn.
  bool buffers_released = false;  // Since the last Pump (see kReleaseIdleMs).
  // A relay turn moves at most this many buffers each way before the loop looks at its
  // sockets again (limits.relay_turn_bytes); a relay that used it up with bytes left is busy
  // and queues for its next turn, behind the other busy ones. The default, 2 MiB with 16 KB
  // buffers, is about 2 ms of a worker's time: a connection that becomes ready waits for at
  // most one turn, however many transfers are busy. Shorter turns cost more CPU per byte when
  // several transfers are busy (8 downloads: about 4% more per GB with 1 MiB turns, 5-10% more
  // with 256 KB ones; interleaved A/B runs).
  uint32_t turn_rounds = 1;

  bool client_eof = false;         // No more bytes will come from the client.
  bool backend_eof = false;        // No more bytes will come from the backend.
  bool backend_shut_wr = false;    // The client's EOF was passed on (shutdown(SHUT_WR)).
  bool close_notify_sent = false;  // The backend's EOF was passed on (close_notify).
  uint32_t ssl_read_want = EPOLLIN;
  uint32_t ssl_write_want = EPOLLOUT;
  // Readiness as last seen: set by epoll events, cleared when a call would block. A call is
  // only made on a socket that may be ready, so a one-way transfer costs no EAGAIN per turn.
  bool client_readable = true;
  bool client_writable = true;
  bool backend_readable = true;
  bool backend_writable = true;
  // The backend has closed its side (or failed): a short read no longer proves the socket empty.
  bool backend_hup = false;
  // The same for the client, and whether its socket is known to be empty.
  ClientSocketFlags client_socket;
  RelayBuffer to_backend;
  RelayBuffer to_client;
  uint64_t bytes_to_backend = 0;
  uint64_t bytes_to_client = 0;
  uint32_t header_left = 0;  // PROXY header bytes still to send (not the client's: not counted).
};

namespace {

// The client socket's BIO is OpenSSL's socket BIO whose reads also keep the ClientSocketFlags
// its app data points to: a read that got fewer bytes than OpenSSL asked for, or EAGAIN, marks
// the socket drained, and a read of a drained socket (no epoll event since) says "retry" without
// a system call. So OpenSSL's read after the server's handshake flight, and the first relay read
// after the handshake, cost nothing. A method of its own rather than a BIO callback, which
// OpenSSL would call around every BIO_ctrl too (several per record).
// (The socket method's own functions are OpenSSL's old-style ones, int-sized; their _ex
// wrappers call the old ones through the BIO's method, so this one's must be old-style too.)
int ReadNotingShort(BIO* bio, char* out, int len) {
  static const auto socket_read = BIO_meth_get_read(BIO_s_socket());
  auto& flags = *static_cast<ClientSocketFlags*>(BIO_get_app_data(bio));
  if (flags.drained && !flags.hup) {
    BIO_clear_retry_flags(bio);
    BIO_set_retry_read(bio);
    return -1;
  }
  const int r = socket_read(bio, out, len);
  flags.drained = (r > 0 && r < len) || (r < 0 && BIO_should_retry(bio));
  return r;
}

const BIO_METHOD* ClientSocketMethod() {
  static const BIO_METHOD* method = [] {
    const BIO_METHOD* sock = BIO_s_socket();
    BIO_METHOD* m = BIO_meth_new(BIO_TYPE_SOCKET, "custody client socket");
    if (m == nullptr || BIO_meth_set_write(m, BIO_meth_get_write(sock)) != 1 ||
        BIO_meth_set_read(m, &ReadNotingShort) != 1 ||
        BIO_meth_set_puts(m, BIO_meth_get_puts(sock)) != 1 ||
        BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(sock)) != 1 ||
        BIO_meth_set_create(m, BIO_meth_get_create(sock)) != 1 ||
        BIO_meth_set_destroy(m, BIO_meth_get_destroy(sock)) != 1) {
      BIO_meth_free(m);
      return static_cast<BIO_METHOD*>(nullptr);
    }
    return m;
  }();
  return method;
}

// AttachClientSocket makes `fd` the transport of `ssl` (not closed with it), its reads keeping
// `flags`.
bool AttachClientSocket(SSL* ssl, int fd, ClientSocketFlags* flags) {
  const BIO_METHOD* method = ClientSocketMethod();
  BIO* bio = method != nullptr ? BIO_new(method) : nullptr;
  if (bio == nullptr) {
    return false;
  }
  BIO_set_fd(bio, fd, BIO_NOCLOSE);
  if (BIO_set_app_data(bio, flags) != 1) {
    BIO_free(bio);
    return false;
  }
  SSL_set_bio(ssl, bio, bio);
  return true;
}

// The worker whose loop runs on this thread (answers read by its own signing lane are queued
// without waking the loop through the eventfd).
thread_local Worker* t_loop_worker = nullptr;
}  // namespace

// AsyncReady is OpenSSL's async callback (SSL_set_async_callback): the provider calls it, on the
// key client's thread, once a paused handshake's signature is in.
static int AsyncReady(SSL* /*ssl*/, void* arg) {
  auto* notify = static_cast<Worker::Connection::Notify*>(arg);
  notify->worker->NotifyReady(notify->id);
  return 1;
}

Worker::Worker(int index, std::vector<UniqueFd> listen_fds, std::shared_ptr<const ProxyState> state,
               ProxyMetrics* metrics, std::string signing_socket)
    : index_(index),
      listen_fds_(std::move(listen_fds)),
      state_(std::move(state)),
      metrics_(metrics),
      signing_socket_(std::move(signing_socket)) {}

Worker::~Worker() {
  lane_.reset();  // Answers what is still in flight while the connections exist.
  for (auto& c : connections_) {
    c->ssl.reset();
  }
}

absl::Status Worker::Init() {
  epoll_.Reset(::epoll_create1(EPOLL_CLOEXEC));
  control_.Reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!epoll_.valid() || !control_.valid()) {
    return absl::InternalError(absl::StrCat("epoll/eventfd: ", ErrnoText(errno)));
  }
  control_watch_ = std::make_unique<Watch>(Watch{Watch::Kind::kControl});
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = control_watch_.get();
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, control_.get(), &ev) != 0) {
    return absl::InternalError(absl::StrCat("epoll_ctl: ", ErrnoText(errno)));
  }
  ready_.Reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  ready_watch_ = std::make_unique<Watch>(Watch{Watch::Kind::kReady});
  ev.data.ptr = ready_watch_.get();
  if (!ready_.valid() || ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, ready_.get(), &ev) != 0) {
    return absl::InternalError(absl::StrCat("epoll/eventfd: ", ErrnoText(errno)));
  }
  if (!signing_socket_.empty()) {
    lane_watch_ = std::make_unique<Watch>(Watch{Watch::Kind::kLane});
    lane_ =
        std::make_unique<SigningLane>(signing_socket_, epoll_.get(), lane_watch_.get(),
                                      absl::StrCat("worker ", index_), metrics_->signing_socket());
  }
  for (size_t i = 0; i < listen_fds_.size(); ++i) {
    listen_watches_.push_back(std::make_unique<Watch>(Watch{Watch::Kind::kListener, nullptr, i}));
    ev.events = EPOLLIN;
    ev.data.ptr = listen_watches_.back().get();
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, listen_fds_[i].get(), &ev) != 0) {
      return absl::InternalError(absl::StrCat("epoll_ctl: ", ErrnoText(errno)));
    }
  }
  return absl::OkStatus();
}

void Worker::SetState(std::shared_ptr<const ProxyState> state) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_state_ = std::move(state);
  }
  const uint64_t one = 1;
  (void)!::write(control_.get(), &one, sizeof(one));
}

void Worker::Drain(int64_t deadline_ms) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_drain_ms_ = deadline_ms;
  }
  const uint64_t one = 1;
  (void)!::write(control_.get(), &one, sizeof(one));
}

void Worker::OnControl() {
  uint64_t n = 0;
  (void)!::read(control_.get(), &n, sizeof(n));
  std::shared_ptr<const ProxyState> state;
  int64_t drain = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    state = std::move(pending_state_);
    drain = std::exchange(pending_drain_ms_, -1);
  }
  if (state != nullptr) {
    state_ = std::move(state);
    spdlog::debug("worker {}: configuration generation {} in use", index_, state_->generation);
  }
  if (drain >= 0) {
    if (!draining_) {
      // Stop accepting: closing the sockets lets the kernel refuse new connections at once.
      for (auto& fd : listen_fds_) {
        ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd.get(), nullptr);
        fd.Reset();
      }
      accepting_ = false;
      spdlog::info("worker {}: draining {} connection(s)", index_, connections_.size());
    }
    draining_ = true;
    drain_deadline_ms_ = drain;
  }
}

void Worker::SetAccepting(bool on) {
  if (on == accepting_ || draining_) {
    return;
  }
  accepting_ = on;
  for (size_t i = 0; i < listen_fds_.size(); ++i) {
    epoll_event ev{};
    ev.events = on ? static_cast<uint32_t>(EPOLLIN) : 0u;
    ev.data.ptr = listen_watches_[i].get();
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, listen_fds_[i].get(), &ev);
  }
}

bool Worker::AtLimit() const {
  return connections_.size() >= state_->limits.max_connections() ||
         handshakes_ >= static_cast<int>(state_->limits.max_handshakes());
}

void Worker::Run() {
  // Signatures asked for during a loop turn leave together at its end, from this thread.
  provider::SetDeferredSigns(true);
  // And go to keyd's signing socket, when there is one and it is up.
  provider::SetSignLane(lane_.get());
  t_loop_worker = this;
  if (lane_ != nullptr) {
    lane_->Connect(absl::Now());
  }
  epoll_event events[kMaxEvents];
  int64_t next_sweep = NowMs() + kSweepMs;
  for (;;) {
    if (draining_ && connections_.empty()) {
      break;
    }
    int timeout = -1;
    if (!to_pump_.empty() || !local_ready_ids_.empty()) {
      timeout = 0;
    } else if (!connections_.empty() || draining_ || !accepting_) {
      timeout = static_cast<int>(std::max<int64_t>(0, next_sweep - NowMs()));
    }
    const int n = ::epoll_wait(epoll_.get(), events, kMaxEvents, timeout);
    if (n < 0 && errno != EINTR) {
      spdlog::error("worker {}: epoll_wait: {}", index_, ErrnoText(errno));
      break;
    }
    for (int i = 0; i < n; ++i) {
      auto* watch = static_cast<Watch*>(events[i].data.ptr);
      switch (watch->kind) {
        case Watch::Kind::kControl:
          OnControl();
          break;
        case Watch::Kind::kReady:
          OnReady();
          break;
        case Watch::Kind::kLane:
          lane_->OnEvent(events[i].events);
          break;
        case Watch::Kind::kListener:
          OnAccept(watch->listener);
          break;
        default:
          OnConnectionEvent(watch, events[i].events);
      }
    }
    ResumeLocal();  // Handshakes whose answers this thread read (the signing lane).
    // One busy relay takes its next turn, then the loop looks at the sockets again: whatever
    // became ready waits for at most one turn however many transfers are busy, and the busy
    // ones take turns in order.
    if (!to_pump_.empty()) {
      Connection* c = to_pump_.front();
      to_pump_.pop_front();
      c->queued_pump = false;
      if (!c->closed) {
        Pump(*c);
      }
    }
    const int64_t now = NowMs();
    if (now >= next_sweep) {
      Sweep(now);
      if (lane_ != nullptr) {
        lane_->Sweep(absl::Now());
        ResumeLocal();
      }
      next_sweep = now + kSweepMs;
    }
    for (Connection* c : to_free_) {
      Free(*c);
    }
    to_free_.clear();
    if (!draining_) {
      SetAccepting(!AtLimit() && now >= accept_backoff_until_ms_);
    }
    provider::FlushDeferredSigns();
  }
  provider::FlushDeferredSigns();
  provider::SetDeferredSigns(false);
  provider::SetSignLane(nullptr);
  t_loop_worker = nullptr;
  spdlog::debug("worker {}: stopped", index_);
}

void Worker::OnAccept(size_t listener) {
  const ListenerRuntime& rt = state_->listeners[listener];
  for (int i = 0; i < kAcceptsPerTurn; ++i) {
    if (AtLimit()) {
      metrics_->RecordAcceptPaused(connections_.size() < state_->limits.max_connections());
      SetAccepting(false);
      return;
    }
    sockaddr_storage peer{};
    socklen_t peer_len = sizeof(peer);
    const int fd = ::accept4(listen_fds_[listener].get(), reinterpret_cast<sockaddr*>(&peer),
                             &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // Out of descriptors or memory: stop accepting for a moment rather than spin (the
        // pending connection stays in the kernel's backlog).
        spdlog::warn("worker {}: accept on {}: {} (accepting again in {} ms)", index_, rt.name,
                     ErrnoText(errno), kAcceptBackoffMs);
        accept_backoff_until_ms_ = NowMs() + kAcceptBackoffMs;
        SetAccepting(false);
      }
      return;  // EAGAIN, or the peer gave up (ECONNABORTED): nothing to do.
    }
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto c = std::make_unique<Connection>();
    c->id = g_next_connection_id.fetch_add(1, std::memory_order_relaxed);
    c->peer = peer;
    c->listener = listener;
    c->state = state_;
    c->runtime = &c->state->listeners[listener];
    c->client.Reset(fd);
    c->ssl = rt.tls->NewSsl();
    if (c->ssl == nullptr || !AttachClientSocket(c->ssl.get(), fd, &c->client_socket)) {
      spdlog::error("[C{} {}] {}: cannot make a TLS connection: {}", c->id, AddressText(peer),
                    rt.name, SslErrorText());
      continue;  // `c` closes the socket.
    }
    c->client_watch.conn = c->backend_watch.conn = c->async_watch.conn = c.get();
    // Signatures answered wake this worker's one eventfd (no eventfd per connection).
    c->notify = {this, c->id};
    SSL_set_async_callback(c->ssl.get(), &AsyncReady);
    SSL_set_async_callback_arg(c->ssl.get(), &c->notify);
    c->accepted_ms = c->last_active_ms = NowMs();
    c->deadline_ms = c->accepted_ms + state_->limits.handshake_timeout_ms();
    c->index = connections_.size();
    Connection& ref = *c;
    ref.client_registered = Register(fd, &ref.client_watch);
    by_id_.emplace(c->id, c.get());
    connections_.push_back(std::move(c));
    ++handshakes_;
    rt.metrics->open->Increment();
    if (spdlog::should_log(spdlog::level::debug)) {
      spdlog::debug("[C{} {}] {}: accepted", ref.id, AddressText(ref.peer), rt.name);
    }
    Handshake(ref);
  }
}

void Worker::NotifyReady(uint64_t id) {
  if (t_loop_worker == this) {
    local_ready_ids_.push_back(id);  // Resumed later in this loop turn (Run).
    return;
  }
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(ready_mu_);
    ready_ids_.push_back(id);
    wake = !ready_signaled_;
    ready_signaled_ = true;
  }
  if (wake) {
    const uint64_t one = 1;
    (void)!::write(ready_.get(), &one, sizeof(one));
  }
}

void Worker::OnReady() {
  uint64_t n = 0;
  (void)!::read(ready_.get(), &n, sizeof(n));
  std::vector<uint64_t> ids;
  {
    std::lock_guard<std::mutex> lock(ready_mu_);
    ids.swap(ready_ids_);
    ready_signaled_ = false;
  }
  Resume(ids);
}

void Worker::Resume(const std::vector<uint64_t>& ids) {
  for (uint64_t id : ids) {
    auto it = by_id_.find(id);
    if (it == by_id_.end()) {
      continue;  // Gone already.
    }
    OnConnectionEvent(&it->second->async_watch, EPOLLIN);
  }
}

void Worker::ResumeLocal() {
  while (!local_ready_ids_.empty()) {
    std::vector<uint64_t> ids;
    ids.swap(local_ready_ids_);
    Resume(ids);
  }
}

void Worker::OnConnectionEvent(Watch* watch, uint32_t events) {
  Connection& c = *watch->conn;
  if (c.abandoned) {
    if (watch->kind == Watch::Kind::kAsync) {
      Handshake(c);  // The job can finish now; the connection is freed then.
    }
  } else if (!c.closed) {
    OnEvent(watch, events);
  }
}

void Worker::OnEvent(Watch* watch, uint32_t events) {
  Connection& c = *watch->conn;
  const bool failed = (events & (EPOLLHUP | EPOLLERR)) != 0;
  if (watch->kind == Watch::Kind::kClient) {
    c.client_readable |= failed || (events & EPOLLIN) != 0;
    c.client_writable |= failed || (events & EPOLLOUT) != 0;
    c.client_socket.hup |= failed || (events & EPOLLRDHUP) != 0;
    if (failed || (events & (EPOLLIN | EPOLLRDHUP)) != 0) {
      c.client_socket.drained = false;  // Bytes (or the end) came since the last read.
    }
  } else if (watch->kind == Watch::Kind::kBackend) {
    c.backend_readable |= failed || (events & EPOLLIN) != 0;
    c.backend_writable |= failed || (events & EPOLLOUT) != 0;
    c.backend_hup |= failed || (events & EPOLLRDHUP) != 0;
  }
  switch (c.phase) {
    case Connection::Phase::kHandshake:
      if (watch->kind == Watch::Kind::kAsync) {
        Handshake(c);
      } else if (!c.paused) {
        // Only when the direction the handshake waits for became ready (or the socket failed).
        if (failed || (events & c.ssl_read_want) != 0) {
          Handshake(c);
        }
      } else if (failed) {
        // Reported even with no interest set: the client left while its signature is made.
        FailHandshake(c, HandshakeOutcome::kAborted,
                      "client went away while its signature was being made");
      }
      break;
    case Connection::Phase::kConnecting:
      if (watch->kind == Watch::Kind::kBackend) {
        OnBackendConnected(c);
      } else if (watch->kind == Watch::Kind::kClient && (events & (EPOLLHUP | EPOLLERR))) {
        Close(c, CloseReason::kClientError, "client went away before the backend answered");
      } else if (!Pump(c) && (events & (EPOLLHUP | EPOLLERR)) && !c.closed) {
        Close(c, CloseReason::kClientError, "client went away before the backend answered");
      }
      break;
    case Connection::Phase::kRelay:
      // A busy relay waiting in the queue takes its turn there; its sockets' news only marks
      // them ready (above), so a busy transfer is served a turn at a time, in its place.
      if (c.queued_pump && !failed) {
        break;
      }
      // A hang-up or error is reported even when nothing is wanted from that socket: if it
      // lets nothing more move, the connection is over.
      if (!Pump(c) && (events & (EPOLLHUP | EPOLLERR)) && !c.closed) {
        Close(c,
              watch->kind == Watch::Kind::kClient ? CloseReason::kClientError
                                                  : CloseReason::kBackendError,
              watch->kind == Watch::Kind::kClient ? "client hung up" : "backend hung up");
      }
      break;
  }
}

bool Worker::Register(int fd, Watch* watch) {
  // Edge-triggered, both directions, once for the socket's life: readiness is tracked in the
  // connection (the *_readable / *_writable flags), so no epoll_ctl is made per transfer.
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
  ev.data.ptr = watch;
  return ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) == 0;
}

void Worker::SyncAsyncFds(Connection& c) {
  size_t n_add = 0;
  size_t n_del = 0;
  if (SSL_get_changed_async_fds(c.ssl.get(), nullptr, &n_add, nullptr, &n_del) != 1 ||
      (n_add == 0 && n_del == 0)) {
    return;
  }
  std::vector<OSSL_ASYNC_FD> add(n_add);
  std::vector<OSSL_ASYNC_FD> del(n_del);
  SSL_get_changed_async_fds(c.ssl.get(), add.data(), &n_add, del.data(), &n_del);
  for (size_t i = 0; i < n_del; ++i) {
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, del[i], nullptr);
    c.async_fds.erase(std::remove(c.async_fds.begin(), c.async_fds.end(), del[i]),
                      c.async_fds.end());
  }
  for (size_t i = 0; i < n_add; ++i) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = &c.async_watch;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, add[i], &ev) == 0) {
      c.async_fds.push_back(add[i]);
    }
  }
}

void Worker::Handshake(Connection& c) {
  ERR_clear_error();
  const int r = SSL_do_handshake(c.ssl.get());
  const int err = r == 1 ? SSL_ERROR_NONE : SSL_get_error(c.ssl.get(), r);
  SyncAsyncFds(c);
  c.paused = err == SSL_ERROR_WANT_ASYNC;
  if (c.abandoned) {
    if (!c.paused) {
      ERR_clear_error();
      c.abandoned = false;
      to_free_.push_back(&c);  // The job is over: nothing refers to the connection any more.
    }
    return;
  }
  switch (err) {
    case SSL_ERROR_NONE: {
      --handshakes_;
      const ListenerRuntime& rt = *c.runtime;
      rt.metrics->handshakes[static_cast<int>(HandshakeOutcome::kOk)]->Increment();
      rt.metrics->handshake_duration->Observe(static_cast<double>(NowMs() - c.accepted_ms) /
                                              1000.0);
      // Signatures are over; relaying needs no ASYNC job around every read and write.
      SSL_clear_mode(c.ssl.get(), SSL_MODE_ASYNC);
      if (spdlog::should_log(spdlog::level::debug)) {
        const char* sni = SSL_get_servername(c.ssl.get(), TLSEXT_NAMETYPE_host_name);
        const unsigned char* alpn = nullptr;
        unsigned int alpn_len = 0;
        SSL_get0_alpn_selected(c.ssl.get(), &alpn, &alpn_len);
        spdlog::debug("[C{} {}] {}: handshake done: {} {} sni={} alpn={} resumed={}", c.id,
                      AddressText(c.peer), rt.name, SSL_get_version(c.ssl.get()),
                      SSL_get_cipher_name(c.ssl.get()), sni != nullptr ? sni : "-",
                      alpn_len > 0 ? std::string(reinterpret_cast<const char*>(alpn), alpn_len)
                                   : std::string("-"),
                      SSL_session_reused(c.ssl.get()) == 1);
      }
      StartBackend(c);
      return;
    }
    case SSL_ERROR_WANT_READ:
      c.ssl_read_want = EPOLLIN;
      c.client_readable = false;
      return;
    case SSL_ERROR_WANT_WRITE:
      c.ssl_read_want = EPOLLOUT;
      c.client_writable = false;
      return;
    case SSL_ERROR_WANT_ASYNC:
      // Waiting for the signature: the client socket is not touched meanwhile (a paused job
      // must be resumed before anything else happens on this connection). The custody provider
      // calls back (AsyncReady); a wait fd, if one was set instead, is watched too. The
      // handshake timeout bounds the wait either way.
      return;
    case SSL_ERROR_ZERO_RETURN:
    case SSL_ERROR_SYSCALL:
      if (ERR_peek_error() == 0) {
        FailHandshake(c, HandshakeOutcome::kAborted,
                      absl::StrCat("client closed the connection during the handshake",
                                   errno != 0 ? absl::StrCat(" (", ErrnoText(errno), ")") : ""));
        return;
      }
      [[fallthrough]];
    default:
      FailHandshake(c, HandshakeOutcome::kFailed, SslErrorText());
  }
}

void Worker::FailHandshake(Connection& c, HandshakeOutcome outcome, const std::string& why) {
  c.runtime->metrics->handshakes[static_cast<int>(outcome)]->Increment();
  spdlog::info("[C{} {}] {}: handshake {}: {}", c.id, AddressText(c.peer), c.runtime->name,
               outcome == HandshakeOutcome::kTimeout ? "timed out" : "failed", why);
  Close(c, CloseReason::kClientError, "");
}

void Worker::StartBackend(Connection& c) {
  const ListenerRuntime& rt = *c.runtime;
  c.to_backend.Init(state_->limits.buffer_bytes(), metrics_->relay_buffer_bytes());
  c.to_client.Init(state_->limits.buffer_bytes(), metrics_->relay_buffer_bytes());
  c.turn_rounds =
      std::max<uint32_t>(1, state_->limits.relay_turn_bytes() / state_->limits.buffer_bytes());
  if (rt.proxy_protocol != ProxyProtocol::kOff) {
    // The header goes first, before any byte of the client's (the buffer is empty here, and
    // at most 107 bytes are far below its smallest size).
    sockaddr_storage local{};
    socklen_t local_len = sizeof(local);
    if (::getsockname(c.client.get(), reinterpret_cast<sockaddr*>(&local), &local_len) != 0) {
      local.ss_family = AF_UNSPEC;  // The header then says the addresses are unknown.
    }
    const std::string header = ProxyProtocolHeader(rt.proxy_protocol, c.peer, local);
    c.to_backend.space();  // Takes the buffer's memory.
    std::memcpy(c.to_backend.tail(), header.data(), header.size());
    c.to_backend.Produce(static_cast<uint32_t>(header.size()));
    c.header_left = static_cast<uint32_t>(header.size());
  }
  const int family = rt.backend_addr.ss_family;
  c.backend.Reset(::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!c.backend.valid()) {
    Close(c, CloseReason::kBackendError, absl::StrCat("backend socket: ", ErrnoText(errno)));
    return;
  }
  if (family != AF_UNIX) {
    const int one = 1;
    ::setsockopt(c.backend.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  c.phase = Connection::Phase::kConnecting;
  c.deadline_ms = NowMs() + rt.connect_timeout_ms;
  if (::connect(c.backend.get(), reinterpret_cast<const sockaddr*>(&rt.backend_addr),
                rt.backend_addr_len) == 0) {
    c.phase = Connection::Phase::kRelay;
    Register(c.backend.get(), &c.backend_watch);
    // A new socket holds no byte that epoll will not report (registering reports what is
    // already there): no read until an event says so.
    c.backend_readable = false;
    Pump(c);
    return;
  }
  if (errno != EINPROGRESS && errno != EAGAIN) {
    Close(c, CloseReason::kBackendError,
          absl::StrCat("backend ", rt.backend_address, ": ", ErrnoText(errno)));
    return;
  }
  Register(c.backend.get(), &c.backend_watch);
  c.backend_writable = false;  // Until the connect completes (EPOLLOUT).
  c.backend_readable = false;  // Until bytes come (EPOLLIN).
  Pump(c);                     // The client may have sent its first bytes with the handshake.
}

void Worker::OnBackendConnected(Connection& c) {
  int err = 0;
  socklen_t len = sizeof(err);
  ::getsockopt(c.backend.get(), SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) {
    Close(c, CloseReason::kBackendError,
          absl::StrCat("backend ", c.runtime->backend_address, ": ", ErrnoText(err)));
    return;
  }
  c.phase = Connection::Phase::kRelay;
  c.last_active_ms = NowMs();
  Pump(c);
}

// Pump moves bytes both ways until neither side can make progress, then waits for the sockets
// that were not ready. It reads from a side only while its buffer has room (backpressure) and
// passes each side's end on once its buffer is empty (half-close).
bool Worker::Pump(Connection& c) {
  c.buffers_released = false;
  bool moved = false;  // Any round made progress.
  const bool connected = c.phase == Connection::Phase::kRelay;
  bool progress = true;
  uint32_t rounds = 0;
  uint64_t to_backend = 0;
  uint64_t to_client = 0;
  while (progress && rounds++ < c.turn_rounds) {
    progress = false;
    // Client -> buffer.
    const bool may_read_client = c.ssl_read_want == EPOLLIN ? c.client_readable : c.client_writable;
    // (Readiness first: space() takes the buffer's memory.)
    if (!c.client_eof && (may_read_client || SSL_has_pending(c.ssl.get()) == 1) &&
        c.to_backend.space() > 0) {
      ERR_clear_error();
      const int n =
          SSL_read(c.ssl.get(), c.to_backend.tail(), static_cast<int>(c.to_backend.space()));
      if (n > 0) {
        c.to_backend.Produce(static_cast<uint32_t>(n));
        progress = true;
        // The socket is empty (a short read, in this call or earlier with no event since) and
        // OpenSSL holds nothing more: skip the read that would only say EAGAIN, unless the
        // client's FIN is already in (then read on, to see the end).
        if (c.client_socket.drained && !c.client_socket.hup && c.ssl_read_want == EPOLLIN &&
            SSL_has_pending(c.ssl.get()) == 0) {
          c.client_readable = false;
        }
      } else {
        switch (SSL_get_error(c.ssl.get(), n)) {
          case SSL_ERROR_WANT_READ:
            c.ssl_read_want = EPOLLIN;
            c.client_readable = false;
            break;
          case SSL_ERROR_WANT_WRITE:
            c.ssl_read_want = EPOLLOUT;
            c.client_writable = false;
            break;
          case SSL_ERROR_ZERO_RETURN:
            c.client_eof = true;
            progress = true;
            break;
          default:
            Close(c, CloseReason::kClientError,
                  absl::StrCat("reading from the client: ",
                               ERR_peek_error() != 0 ? SslErrorText() : ErrnoText(errno)));
            return true;
        }
      }
    }
    // Buffer -> backend.
    if (connected && c.to_backend.size() > 0 && c.backend_writable) {
      const ssize_t n =
          ::send(c.backend.get(), c.to_backend.head(), c.to_backend.size(), MSG_NOSIGNAL);
      if (n > 0) {
        c.to_backend.Consume(static_cast<uint32_t>(n));
        const uint32_t header = std::min(c.header_left, static_cast<uint32_t>(n));
        c.header_left -= header;
        to_backend += static_cast<uint64_t>(n) - header;
        progress = true;
      } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
        c.backend_writable = false;
      } else if (errno != EINTR) {
        Close(c, CloseReason::kBackendError,
              absl::StrCat("writing to the backend: ", ErrnoText(errno)));
        return true;
      }
    }
    if (connected && c.client_eof && c.to_backend.size() == 0 && !c.backend_shut_wr) {
      ::shutdown(c.backend.get(), SHUT_WR);
      c.backend_shut_wr = true;
    }
    // Backend -> buffer.
    if (connected && !c.backend_eof && c.backend_readable && c.to_client.space() > 0) {
      const std::size_t space = c.to_client.space();
      const ssize_t n = ::recv(c.backend.get(), c.to_client.tail(), space, 0);
      if (n > 0) {
        c.to_client.Produce(static_cast<uint32_t>(n));
        progress = true;
        // A short read emptied the socket: with edge-triggered epoll, more data (or the
        // backend's FIN) brings a new event, so the EAGAIN read can be skipped. Unless the FIN
        // is already in (its event came): then read on, to see the end.
        if (static_cast<std::size_t>(n) < space && !c.backend_hup) {
          c.backend_readable = false;
        }
      } else if (n == 0) {
        c.backend_eof = true;
        progress = true;
      } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
        c.backend_readable = false;
      } else if (errno != EINTR) {
        Close(c, CloseReason::kBackendError,
              absl::StrCat("reading from the backend: ", ErrnoText(errno)));
        return true;
      }
    }
    // Buffer -> client.
    const bool may_write_client =
        c.ssl_write_want == EPOLLOUT ? c.client_writable : c.client_readable;
    if (c.to_client.size() > 0 && may_write_client) {
      ERR_clear_error();
      const int n =
          SSL_write(c.ssl.get(), c.to_client.head(), static_cast<int>(c.to_client.size()));
      if (n > 0) {
        c.to_client.Consume(static_cast<uint32_t>(n));
        to_client += static_cast<uint64_t>(n);
        progress = true;
      } else {
        switch (SSL_get_error(c.ssl.get(), n)) {
          case SSL_ERROR_WANT_WRITE:
            c.ssl_write_want = EPOLLOUT;
            c.client_writable = false;
            break;
          case SSL_ERROR_WANT_READ:
            c.ssl_write_want = EPOLLIN;
            c.client_readable = false;
            break;
          default:
            Close(c, CloseReason::kClientError,
                  absl::StrCat("writing to the client: ",
                               ERR_peek_error() != 0 ? SslErrorText() : ErrnoText(errno)));
            return true;
        }
      }
    }
    if (c.backend_eof && c.to_client.size() == 0 && !c.close_notify_sent) {
      ERR_clear_error();
      const int r = SSL_shutdown(c.ssl.get());  // Sends close_notify; reading goes on.
      if (r >= 0) {
        c.close_notify_sent = true;
        progress = true;
      } else {
        const int e = SSL_get_error(c.ssl.get(), r);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
          c.ssl_write_want = e == SSL_ERROR_WANT_WRITE ? EPOLLOUT : EPOLLIN;
          (e == SSL_ERROR_WANT_WRITE ? c.client_writable : c.client_readable) = false;
        } else {
          c.close_notify_sent = true;  // The client is gone; nothing more to say.
          ERR_clear_error();
        }
      }
    }
    moved = moved || progress;
  }
  if (to_backend + to_client > 0) {
    c.last_active_ms = NowMs();
    c.bytes_to_backend += to_backend;
    c.bytes_to_client += to_client;
    if (to_backend > 0) {
      c.runtime->metrics->bytes_client_to_backend->Increment(static_cast<double>(to_backend));
    }
    if (to_client > 0) {
      c.runtime->metrics->bytes_backend_to_client->Increment(static_cast<double>(to_client));
    }
  }
  if (c.client_eof && c.backend_shut_wr && c.backend_eof && c.close_notify_sent &&
      c.to_client.size() == 0) {
    Close(c, CloseReason::kOk, "");
    return true;
  }
  if (progress) {
    // Turn used up with bytes left: busy, the next turn comes in the queue (see Run).
    metrics_->relay_turns_yielded()->Increment();
    if (!c.queued_pump) {
      c.queued_pump = true;
      to_pump_.push_back(&c);
    }
  }
  return moved;
}

void Worker::Close(Connection& c, CloseReason reason, const std::string& why) {
  if (c.closed) {
    return;
  }
  const ListenerRuntime& rt = *c.runtime;
  if (!why.empty()) {
    spdlog::info("[C{} {}] {}: closed: {} (relayed {} bytes to the backend, {} to the client)",
                 c.id, AddressText(c.peer), rt.name, why, c.bytes_to_backend, c.bytes_to_client);
  } else if (spdlog::should_log(spdlog::level::debug)) {
    spdlog::debug("[C{} {}] {}: closed (relayed {} bytes to the backend, {} to the client)", c.id,
                  AddressText(c.peer), rt.name, c.bytes_to_backend, c.bytes_to_client);
  }
  rt.metrics->closed[static_cast<int>(reason)]->Increment();
  c.closed = true;
  rt.metrics->open->Decrement();
  // Closing a descriptor takes it out of epoll (none is duplicated), and Free runs before the
  // next epoll_wait: no EPOLL_CTL_DEL is needed, except for a client socket that stays open.
  c.backend.Reset();
  if (c.paused) {
    if (c.client_registered) {
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c.client.get(), nullptr);
      c.client_registered = false;
    }
    // Never free a connection whose handshake job is paused (it would leak the job and the
    // answer would arrive for freed memory): end the TCP connection now, keep the descriptor
    // (the job's BIO refers to it) and free everything once the job has finished.
    ::shutdown(c.client.get(), SHUT_RDWR);
    c.abandoned = true;
    return;
  }
  to_free_.push_back(&c);
}

void Worker::Free(Connection& c) {
  if (c.queued_pump) {
    to_pump_.erase(std::remove(to_pump_.begin(), to_pump_.end(), &c), to_pump_.end());
  }
  if (c.phase == Connection::Phase::kHandshake) {
    --handshakes_;
  }
  by_id_.erase(c.id);
  c.ssl.reset();  // Closes the wait fd (the provider's cleanup), which leaves epoll with it.
  c.client.Reset();
  // Swap-remove from the connection table.
  const size_t i = c.index;
  if (i != connections_.size() - 1) {
    std::swap(connections_[i], connections_.back());
    connections_[i]->index = i;
  }
  connections_.pop_back();  // Destroys `c`.
}

void Worker::Sweep(int64_t now) {
  const bool drain_over = draining_ && now >= drain_deadline_ms_;
  // Close() may queue frees but never removes from connections_ here, so indices hold.
  for (size_t i = 0; i < connections_.size(); ++i) {
    Connection& c = *connections_[i];
    if (c.closed) {
      continue;
    }
    if (drain_over) {
      if (c.phase == Connection::Phase::kHandshake) {
        c.runtime->metrics->handshakes[static_cast<int>(HandshakeOutcome::kAborted)]->Increment();
      }
      Close(c, CloseReason::kDrained, "drain timeout: closing");
      continue;
    }
    switch (c.phase) {
      case Connection::Phase::kHandshake:
        if (now >= c.deadline_ms) {
          FailHandshake(
              c, HandshakeOutcome::kTimeout,
              absl::StrCat("no finished handshake after ", state_->limits.handshake_timeout_ms(),
                           " ms", c.paused ? " (waiting for the key service)" : ""));
        }
        break;
      case Connection::Phase::kConnecting:
        if (now >= c.deadline_ms) {
          Close(
              c, CloseReason::kBackendError,
              absl::StrCat("backend did not accept within ", c.runtime->connect_timeout_ms, " ms"));
        }
        break;
      case Connection::Phase::kRelay:
        if (now - c.last_active_ms >= state_->limits.idle_timeout_ms()) {
          Close(c, CloseReason::kIdleTimeout,
                absl::StrCat("idle for ", state_->limits.idle_timeout_ms(), " ms"));
        } else if (!c.buffers_released && now - c.last_active_ms >= kReleaseIdleMs) {
          // Bytes waiting (a side not taking them) keep their buffer; OpenSSL keeps its own
          // while a record is partly read or written (SSL_free_buffers says so).
          const bool to_backend = c.to_backend.Release();
          const bool to_client = c.to_client.Release();
          c.buffers_released = to_backend && to_client && SSL_free_buffers(c.ssl.get()) == 1;
        }
        break;
    }
  }
}

}  // namespace custody::proxy
