// SigningLane against a fake keyd driven by the test (a Unix socket in a temporary folder,
// served synchronously): answers reach their requests, and whatever the lane cannot finish goes
// to the gRPC fallback, so no signature is lost when keyd breaks the connection, answers
// UNAVAILABLE, or hangs.
#include "proxy/signing_lane.h"

#include <gtest/gtest.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "common/unique_fd.h"
#include "keyservice/signing_socket_protocol.h"

namespace custody::proxy {
namespace {

using keyservice::StreamSigner;

struct Outcome {
  grpc::StatusCode code;
  std::string signature;
};

class SigningLaneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/custody-lane-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/sign.sock";
    epoll_.Reset(::epoll_create1(EPOLL_CLOEXEC));
    fallback_ = std::make_shared<const provider::SignLane::Fallback>(
        [this](provider::SignLane::Requests requests) {
          for (auto& r : requests) {
            fallen_back_.push_back(r.request.key_name());
          }
        });
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  void Listen() {
    listener_.Reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path_.c_str());
    ASSERT_EQ(::bind(listener_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ASSERT_EQ(::listen(listener_.get(), 4), 0);
  }

  // Accept takes the lane's connection and checks its preface.
  void Accept() {
    server_.Reset(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    ASSERT_TRUE(server_.valid());
    EXPECT_EQ(ReadExactly(keyservice::kSigningPreface.size()), keyservice::kSigningPreface);
  }

  std::string ReadExactly(std::size_t n) {
    std::string out(n, '\0');
    std::size_t got = 0;
    while (got < n) {
      const ssize_t r = ::read(server_.get(), out.data() + got, n - got);
      if (r <= 0) {
        ADD_FAILURE() << "the fake keyd's read ended";
        return "";
      }
      got += static_cast<std::size_t>(r);
    }
    return out;
  }

  custody::v1::SignStreamRequest ReadRequest() {
    const std::string header = ReadExactly(4);
    const auto* p = reinterpret_cast<const unsigned char*>(header.data());
    const std::size_t size = (std::size_t{p[0]} << 24) | (std::size_t{p[1]} << 16) |
                             (std::size_t{p[2]} << 8) | std::size_t{p[3]};
    custody::v1::SignStreamRequest request;
    EXPECT_TRUE(request.ParseFromString(ReadExactly(size)));
    return request;
  }

  void Answer(const custody::v1::SignStreamResponse& response) {
    std::string out;
    keyservice::AppendFrame(response, out);
    ASSERT_EQ(::write(server_.get(), out.data(), out.size()), static_cast<ssize_t>(out.size()));
  }

  // Pump hands the lane its socket's events until `done` holds or 5 s pass.
  template <typename Done>
  void Pump(SigningLane& lane, Done done) {
    for (int i = 0; i < 50 && !done(); ++i) {
      epoll_event ev{};
      if (::epoll_wait(epoll_.get(), &ev, 1, 100) == 1) {
        ASSERT_EQ(ev.data.ptr, &tag_);
        lane.OnEvent(ev.events);
      }
    }
  }

  std::unique_ptr<SigningLane> MakeLane() {
    return std::make_unique<SigningLane>(path_, epoll_.get(), &tag_, "test lane",
                                         metrics_.signing_socket());
  }

  // ConnectedLane starts the fake keyd and returns a lane connected to it.
  std::unique_ptr<SigningLane> ConnectedLane() {
    Listen();
    auto lane = MakeLane();
    lane->Connect(absl::Now());
    EXPECT_TRUE(lane->up());
    Accept();
    return lane;
  }

  // Requests makes `n` requests for keys "k0".."k(n-1)", recording outcomes by key name.
  provider::SignLane::Requests Requests(int n, absl::Duration timeout = absl::Seconds(2)) {
    provider::SignLane::Requests requests;
    for (int i = 0; i < n; ++i) {
      StreamSigner::Request r;
      r.request.set_key_name("k" + std::to_string(i));
      r.request.set_digest(std::string(32, 'd'));
      r.deadline = absl::Now() + timeout;
      r.done = [this, key = r.request.key_name()](const grpc::Status& st,
                                                  const custody::v1::SignResponse& resp) {
        EXPECT_EQ(outcomes_.count(key), 0u) << key << " answered twice";
        outcomes_[key] = {st.error_code(), resp.signature()};
      };
      requests.push_back(std::move(r));
    }
    return requests;
  }

  std::string dir_;
  std::string path_;
  UniqueFd epoll_;
  UniqueFd listener_;
  UniqueFd server_;
  int tag_ = 0;
  std::shared_ptr<const provider::SignLane::Fallback> fallback_;
  std::vector<std::string> fallen_back_;
  std::map<std::string, Outcome> outcomes_;
  ProxyMetrics metrics_;

  double Sent() { return metrics_.signing_socket()->sent->Value(); }
  double OverGrpc() { return metrics_.signing_socket()->over_grpc->Value(); }
  double Moved() { return metrics_.signing_socket()->moved->Value(); }
  double Connected() { return metrics_.signing_socket()->connected->Value(); }
};

TEST_F(SigningLaneTest, AnswersReachTheirRequestsInAnyOrder) {
  auto lane = ConnectedLane();
  auto requests = Requests(2);
  ASSERT_TRUE(lane->TrySend(requests, fallback_));
  EXPECT_TRUE(requests.empty());
  const custody::v1::SignStreamRequest got = ReadRequest();
  ASSERT_EQ(got.items_size(), 2);  // One flush, one message.
  EXPECT_NE(got.items(0).id(), got.items(1).id());
  for (const auto& item : got.items()) {
    EXPECT_GT(item.timeout_ms(), 1000u);  // What is left of the 2 s deadline.
    EXPECT_LE(item.timeout_ms(), 2000u);
  }
  custody::v1::SignStreamResponse response;  // The second first; the first refused.
  auto* second = response.add_results();
  second->set_id(got.items(1).id());
  second->mutable_outcome()->mutable_response()->set_signature("sig-k1");
  auto* first = response.add_results();
  first->set_id(got.items(0).id());
  first->mutable_outcome()->set_code(grpc::StatusCode::PERMISSION_DENIED);
  first->mutable_outcome()->set_message("no");
  Answer(response);
  Pump(*lane, [&] { return outcomes_.size() == 2; });
  ASSERT_EQ(outcomes_.size(), 2u);
  EXPECT_EQ(outcomes_["k1"].code, grpc::StatusCode::OK);
  EXPECT_EQ(outcomes_["k1"].signature, "sig-k1");
  EXPECT_EQ(outcomes_["k0"].code, grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(fallen_back_.empty());
  EXPECT_EQ(lane->pending(), 0u);
  EXPECT_EQ(Sent(), 2);
  EXPECT_EQ(Connected(), 1);
  lane.reset();
  EXPECT_EQ(Connected(), 0);
}

TEST_F(SigningLaneTest, MoreThanABatchLeavesInSeveralMessages) {
  auto lane = ConnectedLane();
  auto requests = Requests(100);
  ASSERT_TRUE(lane->TrySend(requests, fallback_));
  EXPECT_EQ(ReadRequest().items_size(), 64);
  EXPECT_EQ(ReadRequest().items_size(), 36);
  EXPECT_EQ(lane->pending(), 100u);
}

TEST_F(SigningLaneTest, WithNoKeydItRefusesAndLeavesTheRequests) {
  auto lane = MakeLane();  // Nothing listens on the path.
  auto requests = Requests(3);
  EXPECT_FALSE(lane->TrySend(requests, fallback_));
  EXPECT_EQ(requests.size(), 3u);  // Untouched: the caller sends them over gRPC.
  EXPECT_FALSE(lane->up());
  EXPECT_EQ(OverGrpc(), 3);
  EXPECT_EQ(Sent(), 0);
  // It tries again after a second, not before.
  Listen();
  lane->Connect(absl::Now());
  EXPECT_FALSE(lane->up());
  lane->Connect(absl::Now() + absl::Seconds(2));
  EXPECT_TRUE(lane->up());
}

TEST_F(SigningLaneTest, UnavailableIsRetriedOverGrpc) {
  auto lane = ConnectedLane();
  auto requests = Requests(2);
  ASSERT_TRUE(lane->TrySend(requests, fallback_));
  const custody::v1::SignStreamRequest got = ReadRequest();
  custody::v1::SignStreamResponse response;
  for (const auto& item : got.items()) {
    auto* r = response.add_results();
    r->set_id(item.id());
    if (item.request().key_name() == "k0") {
      r->mutable_outcome()->set_code(grpc::StatusCode::UNAVAILABLE);
    }
  }
  Answer(response);
  Pump(*lane, [&] { return lane->pending() == 0; });
  EXPECT_EQ(fallen_back_, std::vector<std::string>{"k0"});
  EXPECT_EQ(Moved(), 1);
  ASSERT_EQ(outcomes_.size(), 1u);
  EXPECT_EQ(outcomes_["k1"].code, grpc::StatusCode::OK);
  EXPECT_TRUE(lane->up());  // keyd answered: the connection stays.
}

TEST_F(SigningLaneTest, ABrokenConnectionHandsItsRequestsToGrpc) {
  auto lane = ConnectedLane();
  auto requests = Requests(5);
  ASSERT_TRUE(lane->TrySend(requests, fallback_));
  ReadRequest();
  server_.Reset();  // keyd goes away without answering.
  Pump(*lane, [&] { return !lane->up(); });
  EXPECT_FALSE(lane->up());
  EXPECT_EQ(fallen_back_.size(), 5u);
  EXPECT_EQ(Moved(), 5);
  EXPECT_EQ(Connected(), 0);
  EXPECT_TRUE(outcomes_.empty());
  EXPECT_EQ(lane->pending(), 0u);
  auto more = Requests(1);
  EXPECT_FALSE(lane->TrySend(more, fallback_));  // Down until its next attempt.
}

TEST_F(SigningLaneTest, AGarbledAnswerBreaksTheConnection) {
  auto lane = ConnectedLane();
  auto requests = Requests(1);
  ASSERT_TRUE(lane->TrySend(requests, fallback_));
  ReadRequest();
  const char garbage[] = {0, 0, 0, 3, '\xff', '\xff', '\xff'};
  ASSERT_EQ(::write(server_.get(), garbage, sizeof(garbage)), 7);
  Pump(*lane, [&] { return !lane->up(); });
  EXPECT_FALSE(lane->up());
  EXPECT_EQ(fallen_back_, std::vector<std::string>{"k0"});
}

TEST_F(SigningLaneTest, AnOverdueAnswerExpiresAndDropsTheConnection) {
  auto lane = ConnectedLane();
  auto requests = Requests(1, absl::Milliseconds(100));
  ASSERT_TRUE(lane->TrySend(requests, fallback_));
  const custody::v1::SignStreamRequest got = ReadRequest();
  lane->Sweep(absl::Now() + absl::Seconds(1));  // keyd hangs past the deadline.
  ASSERT_EQ(outcomes_.size(), 1u);
  EXPECT_EQ(outcomes_["k0"].code, grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(fallen_back_.empty());  // Too late for gRPC too.
  EXPECT_FALSE(lane->up());
  // A late answer on the old connection finds nothing (it is closed; nothing is answered twice).
  custody::v1::SignStreamResponse response;
  response.add_results()->set_id(got.items(0).id());
  std::string out;
  keyservice::AppendFrame(response, out);
  (void)!::send(server_.get(), out.data(), out.size(), MSG_NOSIGNAL);
  EXPECT_EQ(outcomes_.size(), 1u);
}

TEST_F(SigningLaneTest, StoppingAnswersWhatIsLeftCancelled) {
  auto lane = ConnectedLane();
  auto requests = Requests(2);
  ASSERT_TRUE(lane->TrySend(requests, fallback_));
  lane.reset();
  ASSERT_EQ(outcomes_.size(), 2u);
  EXPECT_EQ(outcomes_["k0"].code, grpc::StatusCode::CANCELLED);
  EXPECT_EQ(outcomes_["k1"].code, grpc::StatusCode::CANCELLED);
}

}  // namespace
}  // namespace custody::proxy
