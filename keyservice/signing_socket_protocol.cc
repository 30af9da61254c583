#include "keyservice/signing_socket_protocol.h"

namespace custody::keyservice {

void AppendFrame(const google::protobuf::MessageLite& message, std::string& out) {
  const std::size_t size = message.ByteSizeLong();
  const auto n = static_cast<uint32_t>(size);
  const char header[kFrameHeaderBytes] = {static_cast<char>(n >> 24), static_cast<char>(n >> 16),
                                          static_cast<char>(n >> 8), static_cast<char>(n)};
  out.append(header, kFrameHeaderBytes);
  const std::size_t at = out.size();
  out.resize(at + size);
  message.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(out.data() + at));
}

FrameReader::Result FrameReader::Next(std::string_view& body) {
  if (offset_ > 0 && offset_ == buffer_.size()) {
    buffer_.clear();  // Everything was given out: start over at the front.
    offset_ = 0;
  } else if (offset_ > 0 && offset_ >= buffer_.size() / 2) {
    buffer_.erase(0, offset_);  // Keep the buffer from growing with what was given out.
    offset_ = 0;
  }
  if (buffered() < kFrameHeaderBytes) {
    return Result::kNeedMore;
  }
  const auto* p = reinterpret_cast<const unsigned char*>(buffer_.data() + offset_);
  const std::size_t size = (std::size_t{p[0]} << 24) | (std::size_t{p[1]} << 16) |
                           (std::size_t{p[2]} << 8) | std::size_t{p[3]};
  if (size > max_body_) {
    return Result::kTooLarge;
  }
  if (buffered() - kFrameHeaderBytes < size) {
    return Result::kNeedMore;
  }
  body = std::string_view(buffer_.data() + offset_ + kFrameHeaderBytes, size);
  offset_ += kFrameHeaderBytes + size;
  return Result::kFrame;
}

}  // namespace custody::keyservice
