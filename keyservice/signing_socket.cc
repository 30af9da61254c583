#include "keyservice/signing_socket.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <deque>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status.h"
#include "keyservice/signing_socket_protocol.h"

namespace custody::keyservice {
namespace {

// A client that stops reading its answers for this long loses its connection.
constexpr timeval kSendTimeout{2, 0};

}  // namespace

// Connection serves one client on its own thread (Serve), with one signing task at a time
// (SignBacklog) on that thread or a helper.
class SigningSocket::Connection {
 public:
  Connection(SigningSocket& owner, UniqueFd fd, std::string peer)
      : owner_(owner), fd_(std::move(fd)), caller_{owner.identity_, std::move(peer)} {}

  int fd() const { return fd_.get(); }

  // Serve reads and answers requests until the client closes, breaks the protocol, or keyd
  // stops; it returns once every request it read is answered.
  void Serve() {
    const int flags = ::fcntl(fd_.get(), F_GETFL);
    (void)::fcntl(fd_.get(), F_SETFL, flags & ~O_NONBLOCK);
    (void)::setsockopt(fd_.get(), SOL_SOCKET, SO_SNDTIMEO, &kSendTimeout, sizeof(kSendTimeout));
    const std::string why = Read();
    if (!why.empty()) {
      spdlog::warn("signing socket: {} ({}): {}; connection closed", caller_.peer, caller_.identity,
                   why);
      AuditRecord record{caller_.identity, caller_.peer, "signing_socket"};
      record.outcome = "INVALID_ARGUMENT";
      record.detail = why;
      (void)owner_.audit_.Append(record);
    } else {
      spdlog::debug("signing socket: {} closed", caller_.peer);
    }
    std::unique_lock<std::mutex> lock(mu_);
    changed_.wait(lock, [this] { return !signing_; });
  }

 private:
  // Read reads until the end of the stream; it returns why the client broke the protocol, or ""
  // for a clean end.
  std::string Read() {
    FrameReader frames(owner_.max_message_bytes_);
    std::size_t preface = 0;  // Bytes of the preface seen.
    char buf[16 * 1024];
    for (;;) {
      const ssize_t n = ::read(fd_.get(), buf, sizeof(buf));
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n <= 0) {
        return "";  // The client closed, the connection broke, or keyd is stopping.
      }
      std::string_view in(buf, static_cast<std::size_t>(n));
      if (preface < kSigningPreface.size()) {
        const std::size_t take = std::min(in.size(), kSigningPreface.size() - preface);
        if (in.substr(0, take) != kSigningPreface.substr(preface, take)) {
          return "the client did not open with the signing protocol's preface";
        }
        preface += take;
        in.remove_prefix(take);
      }
      frames.Append(in.data(), in.size());
      std::string_view body;
      FrameReader::Result r;
      while ((r = frames.Next(body)) == FrameReader::Result::kFrame) {
        if (std::string why = Take(body); !why.empty()) {
          return why;
        }
      }
      if (r == FrameReader::Result::kTooLarge) {
        return absl::StrCat("a frame is larger than ", owner_.max_message_bytes_,
                            " bytes (limits.max_message_bytes)");
      }
      std::unique_lock<std::mutex> lock(mu_);
      changed_.wait(lock,
                    [this] { return static_cast<int>(ids_.size()) < kMaxPending || broken_; });
      if (broken_) {
        return "";  // Answers could not be written: the client is gone.
      }
    }
  }

  // Take queues one request message's items for signing; it returns why the message breaks the
  // protocol ("" if it does not).
  std::string Take(std::string_view body) {
    const absl::Time received = absl::Now();
    custody::v1::SignStreamRequest request;
    if (!request.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
      return "a frame is not a SignStreamRequest";
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (absl::Status st = TakeSignStreamMessage(request, received, ids_, backlog_); !st.ok()) {
      return std::string(st.message());
    }
    if (signing_) {
      return "";  // The signing task takes these next.
    }
    signing_ = true;
    const SignCosts::Cost cost = owner_.service_.CostOfReceived(backlog_);
    lock.unlock();
    if (KeyServiceImpl::QuickToSign(cost)) {
      SignBacklog();  // Quick (ECDSA in a local token): a hand-off would cost more.
    } else {
      owner_.service_.Post([this] { SignBacklog(); });
    }
    return "";
  }

  // SignBacklog signs what was read, up to kMaxSignBatch items at a time (several at once when
  // that pays, see KeyServiceImpl::SignEach), and writes each batch's answers in one frame,
  // until nothing is left.
  void SignBacklog() {
    std::string out;
    for (;;) {
      std::vector<ReceivedItem> batch;
      {
        std::lock_guard<std::mutex> lock(mu_);
        batch = TakeSignBatch(backlog_);
        if (batch.empty()) {
          signing_ = false;
          changed_.notify_all();
          return;
        }
      }
      const int n = static_cast<int>(batch.size());
      custody::v1::SignStreamResponse response;
      for (const ReceivedItem& b : batch) {
        response.add_results()->set_id(b.item.id());
      }
      owner_.service_.SignEach(n, owner_.service_.CostOfReceived(batch), [&](int i) {
        owner_.service_.SignStreamItem(caller_, batch[i].received, batch[i].item,
                                       response.mutable_results(i)->mutable_outcome());
      });
      out.clear();
      AppendFrame(response, out);
      const bool written = !broken_ && WriteAll(out);
      std::lock_guard<std::mutex> lock(mu_);
      for (const ReceivedItem& b : batch) {
        ids_.erase(b.item.id());
      }
      if (!written && !broken_) {
        broken_ = true;  // Wake the reader: the client is gone or stopped reading.
        ::shutdown(fd_.get(), SHUT_RDWR);
      }
      changed_.notify_all();
    }
  }

  bool WriteAll(const std::string& data) {
    std::size_t done = 0;
    while (done < data.size()) {
      const ssize_t n = ::send(fd_.get(), data.data() + done, data.size() - done, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n <= 0) {
        spdlog::warn("signing socket: {}: cannot write answers: {}", caller_.peer,
                     n < 0 ? std::strerror(errno) : "closed");
        return false;
      }
      done += static_cast<std::size_t>(n);
    }
    return true;
  }

  SigningSocket& owner_;
  const UniqueFd fd_;
  const Caller caller_;

  std::mutex mu_;  // Guards what follows.
  std::condition_variable changed_;
  std::deque<ReceivedItem> backlog_;  // Read, not yet taken by the signing task.
  std::unordered_set<uint64_t> ids_;  // Read, not yet answered (backlog included).
  bool signing_ = false;              // The signing task is posted or running.
  bool broken_ = false;               // An answer could not be written.
};

absl::StatusOr<std::unique_ptr<SigningSocket>> SigningSocket::Open(
    const custody::v1::KeydUnixSocketConfig& config, KeyServiceImpl& service, AuditLog& audit,
    std::size_t max_message_bytes) {
  CUSTODY_ASSIGN_OR_RETURN(UniqueFd fd,
                           ListenUnix("unix_socket.signing_path", config.signing_path()));
  return std::unique_ptr<SigningSocket>(
      new SigningSocket(config, service, audit, max_message_bytes, std::move(fd)));
}

SigningSocket::SigningSocket(const custody::v1::KeydUnixSocketConfig& config,
                             KeyServiceImpl& service, AuditLog& audit,
                             std::size_t max_message_bytes, UniqueFd fd)
    : path_(config.signing_path()),
      identity_(config.identity()),
      peers_(config, audit),
      service_(service),
      audit_(audit),
      max_message_bytes_(max_message_bytes),
      fd_(std::move(fd)) {}

SigningSocket::~SigningSocket() { Stop(); }

void SigningSocket::Start() {
  acceptor_ = std::thread([this] {
    AcceptUnix(fd_.get(), path_, stopping_, [this](UniqueFd c) { OnConnection(std::move(c)); });
  });
}

void SigningSocket::OnConnection(UniqueFd fd) {
  const std::optional<std::string> peer = peers_.Admit(fd.get(), path_);
  if (!peer.has_value()) {
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (static_cast<int>(open_.size()) >= kMaxConnections) {
    spdlog::warn("signing socket: refused {}: already serving {} connections", *peer,
                 kMaxConnections);
    return;
  }
  spdlog::info("signing socket: {} connected as '{}'", *peer, identity_);
  auto conn = std::make_unique<Connection>(*this, std::move(fd), *peer);
  open_.insert(conn->fd());
  std::thread([this, conn = std::move(conn)]() mutable {
    conn->Serve();
    // The socket is closed under mu_, so Stop never shuts down a descriptor number reused
    // meanwhile; after the notification this thread touches nothing of the SigningSocket.
    std::lock_guard<std::mutex> lock(mu_);
    open_.erase(conn->fd());
    conn.reset();
    all_closed_.notify_all();
  }).detach();
}

void SigningSocket::Stop() {
  if (stopping_.exchange(true)) {
    return;
  }
  ::shutdown(fd_.get(), SHUT_RDWR);  // Wakes the blocked accept().
  if (acceptor_.joinable()) {
    acceptor_.join();
  }
  ::unlink(path_.c_str());
  std::unique_lock<std::mutex> lock(mu_);
  for (int fd : open_) {
    ::shutdown(fd, SHUT_RD);  // The reader sees the end; what it read is still answered.
  }
  all_closed_.wait(lock, [this] { return open_.empty(); });
}

}  // namespace custody::keyservice
