// The signing socket protocol's framing: frames cut from any split of the byte stream, in order;
// an announced length over the limit is refused before its bytes arrive.
#include "keyservice/signing_socket_protocol.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "custody/v1/key_service.pb.h"

namespace custody::keyservice {
namespace {

custody::v1::SignStreamRequest Request(uint64_t id, const std::string& key) {
  custody::v1::SignStreamRequest request;
  custody::v1::SignStreamItem* item = request.add_items();
  item->set_id(id);
  item->set_timeout_ms(2000);
  item->mutable_request()->set_key_name(key);
  item->mutable_request()->set_digest(std::string(32, static_cast<char>(id)));
  return request;
}

// CutAll feeds `stream` to a reader in pieces of `piece` bytes and returns the frames' bodies.
std::vector<std::string> CutAll(const std::string& stream, std::size_t piece,
                                std::size_t max_body = 1 << 20) {
  FrameReader reader(max_body);
  std::vector<std::string> bodies;
  for (std::size_t at = 0; at < stream.size(); at += piece) {
    const std::string chunk = stream.substr(at, piece);
    reader.Append(chunk.data(), chunk.size());
    std::string_view body;
    while (reader.Next(body) == FrameReader::Result::kFrame) {
      bodies.emplace_back(body);
    }
  }
  EXPECT_EQ(reader.buffered(), 0u);
  return bodies;
}

TEST(SigningSocketProtocolTest, FrameIsBigEndianLengthThenMessage) {
  const custody::v1::SignStreamRequest request = Request(7, "lab-ec256");
  std::string out = "xy";  // AppendFrame appends.
  AppendFrame(request, out);
  const std::string body = request.SerializeAsString();
  ASSERT_EQ(out.size(), 2 + 4 + body.size());
  EXPECT_EQ(out.substr(0, 2), "xy");
  EXPECT_EQ(static_cast<unsigned char>(out[2]), (body.size() >> 24) & 0xff);
  EXPECT_EQ(static_cast<unsigned char>(out[3]), (body.size() >> 16) & 0xff);
  EXPECT_EQ(static_cast<unsigned char>(out[4]), (body.size() >> 8) & 0xff);
  EXPECT_EQ(static_cast<unsigned char>(out[5]), body.size() & 0xff);
  EXPECT_EQ(out.substr(6), body);
}

TEST(SigningSocketProtocolTest, FramesSurviveAnySplitOfTheStream) {
  std::string stream;
  std::vector<std::string> sent;
  for (uint64_t id = 1; id <= 20; ++id) {
    const custody::v1::SignStreamRequest r = Request(id, std::string(id * 7, 'k'));
    AppendFrame(r, stream);
    sent.push_back(r.SerializeAsString());
  }
  custody::v1::SignStreamResponse empty;  // A zero-length body is a frame too.
  AppendFrame(empty, stream);
  sent.emplace_back();
  for (std::size_t piece = 1; piece <= stream.size(); piece += (piece < 16 ? 1 : 37)) {
    EXPECT_EQ(CutAll(stream, piece), sent) << "pieces of " << piece << " bytes";
  }
}

TEST(SigningSocketProtocolTest, HalfAFrameWaitsForTheRest) {
  std::string stream;
  AppendFrame(Request(1, "lab-rsa2048"), stream);
  FrameReader reader(1 << 20);
  std::string_view body;
  reader.Append(stream.data(), 3);
  EXPECT_EQ(reader.Next(body), FrameReader::Result::kNeedMore);  // Not even the length.
  reader.Append(stream.data() + 3, stream.size() - 4);
  EXPECT_EQ(reader.Next(body), FrameReader::Result::kNeedMore);  // One byte short.
  reader.Append(stream.data() + stream.size() - 1, 1);
  ASSERT_EQ(reader.Next(body), FrameReader::Result::kFrame);
  custody::v1::SignStreamRequest parsed;
  ASSERT_TRUE(parsed.ParseFromArray(body.data(), static_cast<int>(body.size())));
  EXPECT_EQ(parsed.items(0).request().key_name(), "lab-rsa2048");
  EXPECT_EQ(reader.Next(body), FrameReader::Result::kNeedMore);
}

TEST(SigningSocketProtocolTest, OversizedFrameIsRefusedFromItsLength) {
  FrameReader reader(100);
  const char header[4] = {0, 0, 0, 101};  // 101 bytes announced, none sent.
  reader.Append(header, 4);
  std::string_view body;
  EXPECT_EQ(reader.Next(body), FrameReader::Result::kTooLarge);

  FrameReader huge(1 << 20);
  const char max[4] = {'\xff', '\xff', '\xff', '\xff'};
  huge.Append(max, 4);
  EXPECT_EQ(huge.Next(body), FrameReader::Result::kTooLarge);

  std::string exact;  // At the limit is fine.
  exact.append({0, 0, 0, 100});
  exact.append(100, 'a');
  FrameReader at_limit(100);
  at_limit.Append(exact.data(), exact.size());
  ASSERT_EQ(at_limit.Next(body), FrameReader::Result::kFrame);
  EXPECT_EQ(body, std::string(100, 'a'));
}

TEST(SigningSocketProtocolTest, PrefaceIsEightBytes) {
  EXPECT_EQ(kSigningPreface.size(), 8u);
  EXPECT_EQ(kSigningPreface.back(), '\n');
}

}  // namespace
}  // namespace custody::keyservice
