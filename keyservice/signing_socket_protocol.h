// The signing socket protocol: SignStream's messages over a Unix socket, for a proxy and a keyd on
// one host (keyd's unix_socket.signing_path). It carries only handshake signatures; everything
// else, and signatures when the socket is unreachable, goes over gRPC.
//
// Why not gRPC: on one host, gRPC's HTTP/2 framing, completion queues and thread hand-offs cost
// more CPU per ECDSA signature than the HSM's own work (docs/signing-transport.md). This protocol
// lets the proxy's worker send and read on its own event loop, and keyd sign on the thread that
// read the request.
//
// The wire:
//   - the client first sends kSigningPreface (8 bytes); keyd closes a connection that does not;
//   - then each side sends frames: a 4-byte big-endian length, then that many bytes of one
//     protobuf message. The client sends SignStreamRequest (1 to kMaxSignBatch items, ids not
//     pending already), keyd answers SignStreamResponse, results in any order, matched by id;
//   - a frame longer than the receiver's limit, a message that does not parse, or a broken rule
//     closes the connection (logged on both sides); requests in flight on it are retried by the
//     proxy over gRPC.
//   - keyd's caller is the socket's identity (unix_socket.identity), its uid checked with
//     SO_PEERCRED against unix_socket.allowed_uids, as on keyd's gRPC Unix socket.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "google/protobuf/message_lite.h"

namespace custody::keyservice {

inline constexpr std::string_view kSigningPreface{"CSIGN/1\n"};
inline constexpr std::size_t kFrameHeaderBytes = 4;

// AppendFrame appends `message` to `out` as one frame.
void AppendFrame(const google::protobuf::MessageLite& message, std::string& out);

// FrameReader cuts a byte stream into frames of at most `max_body` bytes each.
class FrameReader {
 public:
  explicit FrameReader(std::size_t max_body) : max_body_(max_body) {}

  // Append adds bytes read from the stream.
  void Append(const char* data, std::size_t n) { buffer_.append(data, n); }

  enum class Result { kFrame, kNeedMore, kTooLarge };
  // Next gives the next whole frame's body in `body` (valid until the next Append or Next) and
  // returns kFrame; kNeedMore when no whole frame is buffered; kTooLarge when the next frame
  // announces more than max_body bytes (the stream cannot be read further).
  Result Next(std::string_view& body);

  // buffered is how many bytes wait to be cut.
  std::size_t buffered() const { return buffer_.size() - offset_; }

 private:
  std::size_t max_body_;
  std::string buffer_;
  std::size_t offset_ = 0;  // Start of the first frame not yet given out.
};

}  // namespace custody::keyservice
