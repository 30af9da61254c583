#include "keyservice/stream_signer.h"

#include <algorithm>
#include <deque>
#include <unordered_map>

#include "keyservice/limits.h"

namespace custody::keyservice {
namespace {

// How often waiting requests are checked against their deadlines.
constexpr absl::Duration kExpiryTick = absl::Milliseconds(50);
// At most one reconnect-backoff reset per this long (see Poll).
constexpr absl::Duration kBackoffResetEvery = absl::Milliseconds(250);

}  // namespace

// Stream is one SignStream call and the requests it carries. All of its state is guarded by the
// signer's mu_; gRPC operations on it are started under mu_ too, and their completions are
// handled under mu_ on the poller thread, which orders the two.
class StreamSigner::Stream {
 public:
  enum class Event { kStarted, kRead, kWritten, kFinished };
  struct Tag {
    Stream* stream;
    Event event;
  };
  struct Pending {
    Done done;
    absl::Time deadline;
  };

  explicit Stream(std::size_t lane) : lane(lane) {}

  const std::size_t lane;
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientAsyncReaderWriter<custody::v1::SignStreamRequest,
                                                custody::v1::SignStreamResponse>>
      rw;
  custody::v1::SignStreamResponse in;
  custody::v1::SignStreamRequest sending;
  std::deque<custody::v1::SignStreamItem> queued;  // Not yet handed to gRPC.
  std::unordered_map<uint64_t, Pending> pending;   // Sent or queued, not yet answered.
  bool started = false;
  bool writing = false;
  bool reading = false;
  bool read_done = false;
  bool cancelled = false;
  bool finishing = false;
  grpc::Status status;
  Tag started_tag{this, Event::kStarted};
  Tag read_tag{this, Event::kRead};
  Tag written_tag{this, Event::kWritten};
  Tag finished_tag{this, Event::kFinished};

  // WriteLocked hands the queued items (up to 64, skipping any that expired meanwhile) to gRPC
  // when the stream is up and no write is in progress.
  void WriteLocked() {
    if (!started || writing || read_done || cancelled) {
      return;
    }
    sending.Clear();
    while (!queued.empty() && sending.items_size() < kMaxSignBatch) {
      if (pending.count(queued.front().id()) != 0) {
        *sending.add_items() = std::move(queued.front());
      }
      queued.pop_front();
    }
    if (sending.items_size() == 0) {
      return;
    }
    writing = true;
    rw->Write(sending, &written_tag);
  }

  // ending says the call is over or going (no new request may join it).
  bool ending() const { return cancelled || read_done; }

  // CancelLocked ends the call; its outstanding operations fail and Finish follows.
  void CancelLocked() {
    if (!cancelled) {
      cancelled = true;
      context.TryCancel();
    }
  }

  // MaybeFinishLocked asks for the call's status once nothing else is outstanding.
  void MaybeFinishLocked() {
    if (finishing || writing || reading || !read_done) {
      return;
    }
    finishing = true;
    rw->Finish(&status, &finished_tag);
  }
};

StreamSigner::StreamSigner(std::shared_ptr<grpc::Channel> channel, int lanes)
    : channel_(channel),
      stub_(custody::v1::KeyService::NewStub(channel)),
      lanes_(static_cast<std::size_t>(std::max(1, lanes)), nullptr),
      poller_([this] { Poll(); }) {}

StreamSigner::~StreamSigner() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    stopping_ = true;
    for (Stream* s : streams_) {
      s->CancelLocked();
    }
    std::fill(lanes_.begin(), lanes_.end(), nullptr);
    all_closed_.wait(lock, [this] { return streams_.empty(); });
  }
  tick_alarm_.Cancel();  // Its completion (if set) is drained by the poller before SHUTDOWN.
  cq_.Shutdown();
  poller_.join();
}

StreamSigner::Stream* StreamSigner::OpenLocked(std::size_t lane) {
  auto* s = new Stream(lane);
  s->context.set_wait_for_ready(false);
  s->rw = stub_->PrepareAsyncSignStream(&s->context, &cq_);
  s->rw->StartCall(&s->started_tag);
  lanes_[lane] = s;
  streams_.push_back(s);
  return s;
}

void StreamSigner::SignMany(std::vector<Request> requests) {
  std::vector<Answer> answers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const absl::Time now = absl::Now();
    Stream* s = nullptr;
    for (Request& r : requests) {
      if (stopping_) {
        answers.push_back(
            {std::move(r.done),
             grpc::Status(grpc::StatusCode::CANCELLED, "the key client is shutting down"),
             {}});
        continue;
      }
      const absl::Duration left = r.deadline - now;
      if (left <= absl::ZeroDuration()) {
        answers.push_back({std::move(r.done),
                           grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                        "signing deadline passed before sending"),
                           {}});
        continue;
      }
      if (s == nullptr) {
        const std::size_t lane = next_lane_++ % lanes_.size();
        s = lanes_[lane] != nullptr ? lanes_[lane] : OpenLocked(lane);
      }
      const uint64_t id = next_id_++;
      custody::v1::SignStreamItem item;
      item.set_id(id);
      *item.mutable_request() = std::move(r.request);
      item.set_timeout_ms(static_cast<uint32_t>(std::clamp<int64_t>(
          absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))), 1, UINT32_MAX)));
      s->queued.push_back(std::move(item));
      s->pending.emplace(id, Stream::Pending{std::move(r.done), r.deadline});
    }
    if (s != nullptr) {
      s->WriteLocked();
      StartTickLocked(now);
    }
  }
  Deliver(answers);
}

void StreamSigner::StartTickLocked(absl::Time now) {
  if (ticking_) {
    return;
  }
  ticking_ = true;
  if (!alarm_set_) {  // Else the alarm set earlier wakes the poller soon enough.
    alarm_set_ = true;
    tick_alarm_.Set(&cq_, absl::ToChronoTime(now + kExpiryTick), &tick_tag_);
  }
}

void StreamSigner::DetachLocked(Stream* s) {
  if (lanes_[s->lane] == s) {
    lanes_[s->lane] = nullptr;
  }
}

void StreamSigner::Deliver(std::vector<Answer>& answers) {
  for (Answer& a : answers) {
    a.done(a.status, a.response);
  }
  answers.clear();
}

void StreamSigner::ExpireLocked(absl::Time now, std::vector<Answer>& answers) {
  for (Stream* s : streams_) {
    bool expired = false;
    for (auto it = s->pending.begin(); it != s->pending.end();) {
      if (it->second.deadline > now) {
        ++it;
        continue;
      }
      answers.push_back({std::move(it->second.done),
                         grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                      "the key service did not answer in time"),
                         {}});
      it = s->pending.erase(it);
      expired = true;
    }
    if (expired && !s->cancelled) {
      // A stream that lets a request expire may be stuck (a replica that hangs): replace it.
      DetachLocked(s);
      s->CancelLocked();
    }
  }
}

void StreamSigner::Poll() {
  std::vector<Answer> answers;
  absl::Time next_expiry = absl::InfiniteFuture();  // Nothing waits yet.
  for (;;) {
    void* raw = nullptr;
    bool ok = false;
    const auto got = cq_.AsyncNext(&raw, &ok, absl::ToChronoTime(next_expiry));
    if (got == grpc::CompletionQueue::SHUTDOWN) {
      return;
    }
    std::unique_lock<std::mutex> lock(mu_);
    bool replica_left = false;  // A stream that was up has ended.
    const absl::Time now = absl::Now();
    const bool alarm = got == grpc::CompletionQueue::GOT_EVENT && raw == &tick_tag_;
    if (alarm) {
      alarm_set_ = false;
    }
    if (now >= next_expiry || alarm) {
      ExpireLocked(now, answers);
      next_expiry = now + kExpiryTick;
    }
    if (got == grpc::CompletionQueue::GOT_EVENT && !alarm) {
      auto* tag = static_cast<Stream::Tag*>(raw);
      Stream* s = tag->stream;
      switch (tag->event) {
        case Stream::Event::kStarted:
          if (!ok) {
            s->read_done = true;  // The call never started: only its status remains.
          } else {
            s->started = true;
            s->reading = true;
            s->rw->Read(&s->in, &s->read_tag);
            s->WriteLocked();
          }
          break;
        case Stream::Event::kRead:
          s->reading = false;
          if (!ok) {
            s->read_done = true;
            break;
          }
          for (custody::v1::SignStreamResult& result : *s->in.mutable_results()) {
            auto it = s->pending.find(result.id());
            if (it == s->pending.end()) {
              continue;  // Answered already (expired).
            }
            custody::v1::SignOutcome& o = *result.mutable_outcome();
            answers.push_back(
                {std::move(it->second.done),
                 o.code() == 0 ? grpc::Status::OK
                               : grpc::Status(static_cast<grpc::StatusCode>(o.code()), o.message()),
                 std::move(*o.mutable_response())});
            s->pending.erase(it);
          }
          s->in.Clear();
          s->reading = true;
          s->rw->Read(&s->in, &s->read_tag);
          break;
        case Stream::Event::kWritten:
          s->writing = false;
          if (!ok) {
            s->CancelLocked();  // The call is over; the read in progress fails next.
          } else {
            s->WriteLocked();
          }
          break;
        case Stream::Event::kFinished: {
          const grpc::Status st = s->status.ok()
                                      ? grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                                     "the key service ended the signing stream")
                                      : s->status;
          for (auto& [id, p] : s->pending) {
            answers.push_back({std::move(p.done), st, {}});
          }
          replica_left = s->started && !stopping_;
          DetachLocked(s);
          streams_.erase(std::find(streams_.begin(), streams_.end(), s));
          delete s;
          s = nullptr;
          if (streams_.empty()) {
            all_closed_.notify_all();
          }
          break;
        }
      }
      if (s != nullptr) {
        if (s->ending()) {
          DetachLocked(s);  // New requests go to a new stream.
        }
        s->MaybeFinishLocked();
      }
    }
    // Tick while requests wait; idle, wake for completions only (20 wake-ups a second of an
    // idle key client showed on the proxy worker's CPU).
    ticking_ = std::any_of(streams_.begin(), streams_.end(),
                           [](const Stream* st) { return !st->pending.empty(); });
    if (!ticking_) {
      next_expiry = absl::InfiniteFuture();
    } else if (next_expiry == absl::InfiniteFuture()) {
      next_expiry = now + kExpiryTick;
    }
    lock.unlock();
    if (replica_left && now - last_backoff_reset_ >= kBackoffResetEvery) {
      // A stream that was up has ended: its replica drained, stopped or dropped the connection
      // (or we cancelled the stream, see ExpireLocked). Another replica may have come back a
      // moment ago (a rolling restart) while its connection is still in reconnect backoff (up to
      // a second): try every address now, so that signatures do not fail meanwhile. Only streams
      // that were up trigger this, at most once per kBackoffResetEvery (the lanes on one replica
      // end together), so a key service that is down altogether is not dialled per request.
      last_backoff_reset_ = now;
      grpc::experimental::ChannelResetConnectionBackoff(channel_.get());
    }
    Deliver(answers);
  }
}

}  // namespace custody::keyservice
