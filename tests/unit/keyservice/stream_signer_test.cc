// StreamSigner's deadlines when its first stream cannot start: a key service that accepts the TCP
// connection and never speaks HTTP/2 keeps the channel connecting (gRPC waits up to 20 s for a
// connection attempt). A request made while the signer was idle must still be answered by its
// deadline (DEADLINE_EXCEEDED), not when the connection attempt gives up (UNAVAILABLE).
#include "keyservice/stream_signer.h"

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>

#include "common/unique_fd.h"

namespace custody::keyservice {
namespace {

TEST(StreamSignerTest, ARequestFromIdleIsAnsweredByItsDeadlineWhileTheStreamCannotStart) {
  // A listener that never accepts: the kernel completes the TCP handshake, nobody answers.
  UniqueFd silent(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(silent.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(silent.get(), 16), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(::getsockname(silent.get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string target = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));

  StreamSigner signer(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()), 1);
  std::mutex mu;
  std::condition_variable cv;
  std::optional<grpc::StatusCode> code;
  std::vector<StreamSigner::Request> one(1);
  one[0].request.set_key_name("lab-ec256");
  one[0].deadline = absl::Now() + absl::Milliseconds(200);
  one[0].done = [&](const grpc::Status& st, const custody::v1::SignResponse&) {
    std::lock_guard<std::mutex> lock(mu);
    code = st.error_code();
    cv.notify_all();
  };
  signer.SignMany(std::move(one));
  std::unique_lock<std::mutex> lock(mu);
  cv.wait_for(lock, std::chrono::seconds(60), [&] { return code.has_value(); });
  ASSERT_TRUE(code.has_value());
  EXPECT_EQ(*code, grpc::StatusCode::DEADLINE_EXCEEDED);
}

}  // namespace
}  // namespace custody::keyservice
