#include "proxy/signing_lane.h"

#include <errno.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "keyservice/limits.h"

namespace custody::proxy {
namespace {

using keyservice::StreamSigner;

constexpr absl::Duration kRetryEvery = absl::Seconds(1);
// Answers are a few hundred bytes each; a frame longer than this is not one.
constexpr std::size_t kMaxAnswerFrame = 4 * 1024 * 1024;

grpc::Status Expired() {
  return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                      "no answer on the signing socket within the signing deadline");
}

}  // namespace

SigningLane::SigningLane(std::string path, int epoll_fd, void* tag, std::string label,
                         SigningSocketMetrics* metrics)
    : path_(std::move(path)),
      epoll_fd_(epoll_fd),
      tag_(tag),
      label_(std::move(label)),
      metrics_(*metrics),
      in_(kMaxAnswerFrame) {}

SigningLane::~SigningLane() {
  if (fd_.valid()) {
    metrics_.connected->Decrement();
  }
  for (auto& [id, p] : pending_) {
    p.request.done(grpc::Status(grpc::StatusCode::CANCELLED, "the proxy worker stopped"), {});
  }
}

void SigningLane::Connect(absl::Time now) {
  if (fd_.valid() || now < retry_at_) {
    return;
  }
  retry_at_ = now + kRetryEvery;
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path_.c_str(), std::min(path_.size(), sizeof(addr.sun_path) - 1));
  if (!fd.valid() ||
      ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (!reported_down_) {
      spdlog::warn("{}: signing socket {} unreachable ({}); signing over gRPC, retrying every {}",
                   label_, path_, std::strerror(errno), absl::FormatDuration(kRetryEvery));
      reported_down_ = true;
    }
    return;
  }
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
  ev.data.ptr = tag_;
  if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd.get(), &ev) != 0) {
    spdlog::error("{}: signing socket: epoll_ctl: {}", label_, std::strerror(errno));
    return;
  }
  fd_ = std::move(fd);
  metrics_.connected->Increment();
  reported_down_ = false;
  out_.assign(keyservice::kSigningPreface);
  out_sent_ = 0;
  in_ = keyservice::FrameReader(kMaxAnswerFrame);
  spdlog::info("{}: signing socket {} connected", label_, path_);
  Flush();
}

bool SigningLane::TrySend(Requests& requests, const std::shared_ptr<const Fallback>& fallback) {
  if (!fd_.valid()) {
    Connect(absl::Now());
  }
  if (!fd_.valid() || pending_.size() + requests.size() > kMaxPending) {
    Count(&SigningSocketMetrics::over_grpc, requests.size());
    return false;
  }
  Count(&SigningSocketMetrics::sent, requests.size());
  const absl::Time now = absl::Now();
  custody::v1::SignStreamRequest message;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    StreamSigner::Request& r = requests[i];
    const uint64_t id = next_id_++;
    custody::v1::SignStreamItem* item = message.add_items();
    item->set_id(id);
    *item->mutable_request() = r.request;
    item->set_timeout_ms(
        static_cast<uint32_t>(std::max<int64_t>(1, absl::ToInt64Milliseconds(r.deadline - now))));
    pending_.emplace(id, Pending{std::move(r), fallback});
    if (message.items_size() == keyservice::kMaxSignBatch || i + 1 == requests.size()) {
      keyservice::AppendFrame(message, out_);
      message.Clear();
    }
  }
  requests.clear();
  Flush();
  return true;
}

void SigningLane::Flush() {
  while (fd_.valid() && out_sent_ < out_.size()) {
    const ssize_t n =
        ::send(fd_.get(), out_.data() + out_sent_, out_.size() - out_sent_, MSG_NOSIGNAL);
    if (n > 0) {
      out_sent_ += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return;  // EPOLLOUT calls again.
    }
    Break(absl::StrCat("cannot write: ", std::strerror(errno)));
    return;
  }
  out_.clear();
  out_sent_ = 0;
}

void SigningLane::OnEvent(uint32_t events) {
  if (!fd_.valid()) {
    return;
  }
  if (events & EPOLLOUT) {
    Flush();
  }
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
    ReadAnswers((events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0);
  }
}

void SigningLane::ReadAnswers(bool hung_up) {
  char buf[16 * 1024];
  for (bool drained = false; !drained && fd_.valid();) {
    const ssize_t n = ::read(fd_.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return;
    }
    if (n <= 0) {
      Break(n == 0 ? "keyd closed it" : absl::StrCat("cannot read: ", std::strerror(errno)));
      return;
    }
    // A short read emptied the socket: edge-triggered epoll reports the next answers, so the
    // read that would only say EAGAIN is skipped. Unless keyd's end was reported: then read
    // on, to see it.
    drained = static_cast<std::size_t>(n) < sizeof(buf) && !hung_up;
    in_.Append(buf, static_cast<std::size_t>(n));
    std::string_view body;
    keyservice::FrameReader::Result r;
    while ((r = in_.Next(body)) == keyservice::FrameReader::Result::kFrame) {
      custody::v1::SignStreamResponse response;
      if (!response.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
        Break("an answer is not a SignStreamResponse");
        return;
      }
      for (custody::v1::SignStreamResult& result : *response.mutable_results()) {
        auto it = pending_.find(result.id());
        if (it == pending_.end()) {
          continue;  // Expired and answered already.
        }
        Pending p = std::move(it->second);
        pending_.erase(it);
        custody::v1::SignOutcome& outcome = *result.mutable_outcome();
        const auto code = static_cast<grpc::StatusCode>(outcome.code());
        if (code == grpc::StatusCode::UNAVAILABLE) {
          Count(&SigningSocketMetrics::moved, 1);
          Requests again;
          again.push_back(std::move(p.request));
          (*p.fallback)(std::move(again));
          continue;
        }
        p.request.done(
            code == grpc::StatusCode::OK ? grpc::Status::OK : grpc::Status(code, outcome.message()),
            outcome.response());
      }
    }
    if (r == keyservice::FrameReader::Result::kTooLarge) {
      Break("an answer frame is too large");
      return;
    }
  }
}

void SigningLane::Sweep(absl::Time now) {
  bool expired = false;
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->second.request.deadline <= now) {
      StreamSigner::Done done = std::move(it->second.request.done);
      it = pending_.erase(it);
      done(Expired(), {});
      expired = true;
    } else {
      ++it;
    }
  }
  if (expired && fd_.valid()) {
    Break("an answer is overdue");
  }
  Connect(now);
}

void SigningLane::Break(const std::string& why) {
  spdlog::warn("{}: signing socket {}: {}; {} signatures in flight move to gRPC", label_, path_,
               why, pending_.size());
  fd_.Reset();  // Closing it takes it out of epoll.
  metrics_.connected->Decrement();
  out_.clear();
  out_sent_ = 0;
  retry_at_ = absl::Now() + kRetryEvery;
  SendOver(std::exchange(pending_, {}), absl::Now());
}

void SigningLane::SendOver(std::unordered_map<uint64_t, Pending> requests, absl::Time now) {
  // Usually all share one fallback (one key client); keep each fallback's requests together.
  while (!requests.empty()) {
    const std::shared_ptr<const Fallback> fallback = requests.begin()->second.fallback;
    Requests batch;
    for (auto it = requests.begin(); it != requests.end();) {
      if (it->second.fallback != fallback) {
        ++it;
        continue;
      }
      if (it->second.request.deadline <= now) {
        it->second.request.done(Expired(), {});
      } else {
        batch.push_back(std::move(it->second.request));
        Count(&SigningSocketMetrics::moved, 1);
      }
      it = requests.erase(it);
    }
    if (!batch.empty()) {
      (*fallback)(std::move(batch));
    }
  }
}

}  // namespace custody::proxy
